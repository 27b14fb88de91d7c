"""Scores -> ranks -> benchmark metrics, in numpy.

The protocol (VLM2Vec / mmE5): the positive is candidate 0 and an argmax picks the first index, so a candidate
outranks the positive only with a strictly higher score; the same item as the positive never does. Every metric
here derives from the positive's rank, so all of them share that tie rule.
"""
import numpy as np

from mme5_jax.eval.catalog import META_TASKS, MMEB_SUBSETS


def pair_scores(vectors: np.ndarray, eval_set, rows_per_block: int = 256, cols_per_block: int = 4096) -> np.ndarray:
    """Cosine score of every (query, candidate) pair of `eval_set`, flat like `eval_set.candidates`.

    A block of rows is multiplied by its unique candidates, `cols_per_block` at a time (one matrix product each),
    and the pairs are gathered from the products. Each candidate vector is read once per row block rather than
    once per pair, and memory stays bounded with thousands of candidates per row and 4096-d vectors.
    """
    offsets = eval_set.offsets
    scores = np.empty(len(eval_set.candidates), np.float32)
    row_of_pair = np.repeat(np.arange(eval_set.num_rows), np.diff(offsets))
    for start in range(0, eval_set.num_rows, rows_per_block):
        stop = min(start + rows_per_block, eval_set.num_rows)
        span = slice(offsets[start], offsets[stop])
        unique, column = np.unique(eval_set.candidates[span], return_inverse=True)
        rows = row_of_pair[span] - start
        by_column = np.argsort(column, kind="stable")
        bounds = np.searchsorted(column[by_column], np.arange(0, len(unique) + cols_per_block, cols_per_block))
        queries = vectors[eval_set.queries[start:stop]]
        block_scores = np.empty(len(column), np.float32)
        for b, first in enumerate(range(0, len(unique), cols_per_block)):
            product = queries @ vectors[unique[first:first + cols_per_block]].T
            pairs = by_column[bounds[b]:bounds[b + 1]]
            block_scores[pairs] = product[rows[pairs], column[pairs] - first]
        scores[span] = block_scores
    return scores


def positive_ranks(scores: np.ndarray, candidates: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's positive: candidates that score strictly higher and are not the same item."""
    counts = np.diff(offsets)
    if not len(counts):
        return np.zeros(0, np.int64)
    starts = offsets[:-1]
    positive_score = np.repeat(scores[starts], counts)
    positive_item = np.repeat(candidates[starts], counts)
    above = (scores > positive_score) & (candidates != positive_item)
    return np.add.reduceat(above.astype(np.int64), starts)


def ranking_metrics(ranks: np.ndarray, ks=(1, 5, 10), ndcg_k: int = 10) -> dict:
    """Recall@k, MRR and nDCG@k of one relevant candidate per query (None when there are no rows).

    With a single relevant candidate, recall@1 is MMEB's Precision@1 and nDCG@k is 1/log2(rank + 2) inside the
    top k, 0 outside.
    """
    ranks = np.asarray(ranks)
    names = [f"recall@{k}" for k in ks] + ["mrr", f"ndcg@{ndcg_k}"]
    if not len(ranks):
        return dict.fromkeys(names)
    values = [float(np.mean(ranks < k)) for k in ks]
    values.append(float(np.mean(1.0 / (ranks + 1))))
    values.append(float(np.mean(np.where(ranks < ndcg_k, 1.0 / np.log2(ranks + 2.0), 0.0))))
    return dict(zip(names, values))


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def mmeb_summary(precision: dict) -> dict:
    """Macro averages of per-dataset Precision@1 (`{name: value | None}`): per meta-task, IND, OOD and overall.

    As in the paper, each average is the plain mean over its datasets. `coverage` gives [scored, defined] per
    group, so an average over part of the benchmark is never mistaken for the full one.
    """
    groups = {task: [s.name for s in MMEB_SUBSETS.values() if s.meta_task == task] for task in META_TASKS}
    groups["ind"] = [s.name for s in MMEB_SUBSETS.values() if s.split == "ind"]
    groups["ood"] = [s.name for s in MMEB_SUBSETS.values() if s.split == "ood"]
    groups["overall"] = list(MMEB_SUBSETS)
    averages = {g: _mean([precision.get(n) for n in names]) for g, names in groups.items()}
    coverage = {g: [sum(precision.get(n) is not None for n in names), len(names)] for g, names in groups.items()}
    return {"meta_tasks": {t: averages[t] for t in META_TASKS}, "ind": averages["ind"], "ood": averages["ood"],
            "overall": averages["overall"], "coverage": coverage}


def average_metrics(per_set: dict, names) -> dict:
    """Macro average of each metric in `names` over the sets that have it."""
    return {name: _mean([m.get(name) for m in per_set.values()]) for name in names}
