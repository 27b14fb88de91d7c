"""Evaluation runs: the unique items of all sets are encoded once (through the cache), then each set is scored.

`evaluate_sets(encode, sets)` is the single path behind `mme5 eval` and the trainer's held-out evaluation
(`mme5_jax.train.heldout`): the trainer passes the `encode(items) -> [N, D]` of an `Embedder` over its in-memory
model and gets the numbers its saved checkpoint gets here.
"""
import numpy as np
from tqdm import tqdm

from mme5_jax.eval.cache import item_key
from mme5_jax.eval.catalog import MMEB_SUBSETS, XTD_KS, XTD_LANGUAGES
from mme5_jax.eval.metrics import average_metrics, mmeb_summary, pair_scores, positive_ranks, ranking_metrics
from mme5_jax.eval.readers import DataError, EvalSet, ExistsCache, present_subsets, read_parquet_set
from mme5_jax.processing import BadItemError

METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
UNREADABLE = "unreadable_item"


def _encode_chunk(encode, items) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Encodes `items`, dropping any the encoder rejects (`BadItemError`) and retrying the rest."""
    good, bad = list(range(len(items))), {}
    while good:
        try:
            vectors = np.asarray(encode([{"text": items[i][0], "image": items[i][1]} for i in good]), np.float32)
            return vectors, good, bad
        except BadItemError as err:
            bad[good.pop(err.index)] = err.message
    return np.zeros((0, 0), np.float32), good, bad


def encode_unique(items, encode, cache=None, chunk_size: int = 1024, progress: bool = False):
    """[U, D] vectors of unique (text, image) `items` and {index: reason} of those the encoder rejected.

    Cached items are read, the rest encoded in chunks of `chunk_size` and each chunk written to the cache as soon
    as it is done; refused items are remembered there too. Rows of refused items are zero.
    """
    keys = [item_key(item) for item in items] if cache is not None else None
    found, cached = cache.get(keys) if cache is not None else (np.zeros(len(items), bool), None)
    bad = cache.rejected(keys) if cache is not None else {}
    todo = np.array([i for i in np.flatnonzero(~found) if i not in bad], np.int64)
    vectors = cached
    with tqdm(total=len(todo), desc="encoding", unit="item", disable=not progress or not len(todo)) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            chunk_vectors, good, chunk_bad = _encode_chunk(encode, [items[i] for i in chunk])
            for position, message in chunk_bad.items():
                bad[int(chunk[position])] = message
                if len(bad) <= 5:
                    tqdm.write(f"skipping rows with item {items[chunk[position]]!r}: {message}")
            if good:
                if vectors is None:
                    vectors = np.zeros((len(items), chunk_vectors.shape[1]), np.float32)
                vectors[chunk[good]] = chunk_vectors
            if cache is not None:
                cache.put([keys[i] for i in chunk[good]], chunk_vectors)
                cache.reject({keys[chunk[p]]: message for p, message in chunk_bad.items()})
            bar.update(len(chunk))
    if vectors is None:
        vectors = np.zeros((len(items), 0), np.float32)
    return vectors, bad


def _reindexed(eval_set: EvalSet, index: np.ndarray, items: list) -> EvalSet:
    return EvalSet(eval_set.name, items, index[eval_set.queries], index[eval_set.candidates], eval_set.offsets,
                   eval_set.skipped.copy())


def evaluate_sets(encode, sets, *, cache=None, chunk_size: int = 1024, ks=(1, 5, 10), progress: bool = False) -> dict:
    """Ranking metrics of each set with an `encode(items) -> [N, D]` callable (L2-normalised rows).

    Returns `{"sets": {name: {recall@k..., mrr, ndcg@10, n, skipped, skipped_reasons}}, "average": {...}}`;
    `n` counts the rows scored and `skipped` the rows read but not scored (reasons in `skipped_reasons`).
    """
    union = {}
    indices = [np.array([union.setdefault(item, len(union)) for item in s.items], np.int64) for s in sets]
    items = list(union)
    global_sets = [_reindexed(s, index, items) for s, index in zip(sets, indices)]
    vectors, bad = encode_unique(items, encode, cache, chunk_size, progress)
    results = {}
    for eval_set in global_sets:
        eval_set = eval_set.without_items(list(bad), UNREADABLE) if bad else eval_set
        ranks = positive_ranks(pair_scores(vectors, eval_set), eval_set.candidates, eval_set.offsets)
        metrics = ranking_metrics(ranks, ks)
        metrics.update(n=eval_set.num_rows, skipped=sum(eval_set.skipped.values()),
                       skipped_reasons=dict(sorted(eval_set.skipped.items())))
        results[eval_set.name] = metrics
    names = [f"recall@{k}" for k in ks] + ["mrr", "ndcg@10"]
    return {"sets": results, "average": average_metrics(results, names)}


def _read_sets(data_dir, names, image_root, progress):
    exists = ExistsCache()
    return [read_parquet_set(data_dir, name, image_root, exists)
            for name in tqdm(names, desc="reading", unit="set", disable=not progress)]


def select_subsets(data_dir, requested, known, what) -> tuple[list[str], list[str]]:
    """(subsets to score, known subsets absent from `data_dir`); an unknown or absent requested name is an error."""
    if requested:
        unknown = [n for n in requested if n not in known]
        if unknown:
            raise DataError(f"unknown {what} {unknown}; choose from {list(known)}")
        present = present_subsets(data_dir, requested)
        absent = [n for n in requested if n not in present]
        if absent:
            raise DataError(f"{what} {absent} not found under {data_dir}")
        return list(requested), []
    names = present_subsets(data_dir, known)
    if not names:
        raise DataError(f"none of the {what} {list(known)} has a directory under {data_dir}")
    return names, [n for n in known if n not in names]


def evaluate_mmeb(encode, data_dir, *, image_root=None, datasets=None, cache=None, chunk_size=1024,
                  progress=True) -> dict:
    """MMEB Precision@1 per dataset and its macro averages.

    Without `datasets`, every MMEB subset found under `data_dir` is scored and the absent ones are listed
    under `missing`.
    """
    names, missing = select_subsets(data_dir, datasets, MMEB_SUBSETS, "MMEB datasets")
    sets = _read_sets(data_dir, names, image_root, progress)
    scored = evaluate_sets(encode, sets, cache=cache, chunk_size=chunk_size, ks=(1,), progress=progress)["sets"]
    per_dataset = {name: {"precision@1": m["recall@1"], "n": m["n"], "skipped": m["skipped"],
                          "skipped_reasons": m["skipped_reasons"], "meta_task": MMEB_SUBSETS[name].meta_task,
                          "split": MMEB_SUBSETS[name].split} for name, m in scored.items()}
    summary = mmeb_summary({name: m["precision@1"] for name, m in per_dataset.items()})
    return {"benchmark": "mmeb", "datasets": per_dataset, **summary, "missing": missing}


def evaluate_xtd(encode, data_dir, *, image_root=None, languages=None, cache=None, chunk_size=1024,
                 progress=True) -> dict:
    """XTD-10 text-to-image Recall@1/5/10 per language and averaged over the languages scored."""
    names, missing = select_subsets(data_dir, languages, XTD_LANGUAGES, "XTD languages")
    sets = _read_sets(data_dir, names, image_root, progress)
    scored = evaluate_sets(encode, sets, cache=cache, chunk_size=chunk_size, ks=XTD_KS, progress=progress)
    keys = [f"recall@{k}" for k in XTD_KS]
    per_language = {name: {**{k: m[k] for k in keys}, "n": m["n"], "skipped": m["skipped"],
                           "skipped_reasons": m["skipped_reasons"]} for name, m in scored["sets"].items()}
    return {"benchmark": "xtd", "languages": per_language, "average": {k: scored["average"][k] for k in keys},
            "coverage": [len(names), len(XTD_LANGUAGES)], "missing": missing}
