"""`mme5 eval {mmeb,xtd}`: score a model on a local copy of MMEB-eval or XTD-10, write results.json and a
Markdown report beside it.

The model is only loaded when some item is not in the embedding cache, so a rerun of a finished evaluation
(e.g. to regenerate the report, or after adding a dataset) costs no encoder work.
"""
import argparse
import json
import os
import sys
import uuid

from mme5_jax.eval.cache import EmbeddingCache, default_cache_dir, model_fingerprint
from mme5_jax.eval.catalog import MMEB_SUBSETS, XTD_LANGUAGES
from mme5_jax.eval.harness import evaluate_mmeb, evaluate_xtd, select_subsets
from mme5_jax.eval.readers import DataError
from mme5_jax.eval.report import mmeb_markdown, xtd_markdown
from mme5_jax.model import DTYPES
from mme5_jax.processing import BOS_MODES


def add_arguments(parser):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="Hugging Face Mllama directory or converted checkpoint")
    common.add_argument("--data", required=True, help="local copy of the dataset repository (one folder per subset)")
    common.add_argument("--image-root", default=None, help="base of the rows' relative image paths (default: --data)")
    common.add_argument("--output", required=True, help="results.json to write; the Markdown report goes beside it")
    common.add_argument("--markdown", default=None, help="where to write the Markdown report (default: OUTPUT.md)")
    common.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                        help="compute dtype of the model (default: bfloat16, as mmE5 evaluates)")
    common.add_argument("--batch-size", type=int, default=16, help="items per device step (rounded up to the mesh)")
    common.add_argument("--max-length", type=int, default=256, help="token limit; longer texts are truncated")
    common.add_argument("--bos", default="processor", choices=BOS_MODES,
                        help="BOS layout: follow the installed processor, or the single-BOS transformers-4.45 layout")
    common.add_argument("--fsdp", type=int, default=1, help="mesh axis that shards the weights (large models)")
    common.add_argument("--tensor", type=int, default=1, help="mesh axis for tensor parallelism")
    common.add_argument("--cache-dir", default=None,
                        help=f"embedding cache (default: $MME5_CACHE/eval_embeddings, else {default_cache_dir()})")
    common.add_argument("--no-cache", action="store_true", help="encode everything and cache nothing")
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    mmeb = sub.add_parser("mmeb", parents=[common], help="MMEB-eval: Precision@1 on 36 datasets",
                          description="MMEB-eval Precision@1 per dataset, macro-averaged per meta-task, IND, OOD "
                                      "and overall. --data holds <Subset>/*.parquet.")
    mmeb.add_argument("--datasets", nargs="+", metavar="NAME",
                      help=f"subsets to score (default: every one under --data); known: {' '.join(MMEB_SUBSETS)}")
    xtd = sub.add_parser("xtd", parents=[common], help="XTD-10: text-to-image Recall@1/5/10 in 7 languages",
                         description="XTD-10 text-to-image Recall@1/5/10 per language and on average. "
                                     "--data holds <lang>/*.parquet.")
    xtd.add_argument("--languages", nargs="+", metavar="LANG",
                     help=f"languages to score (default: every one under --data); known: {' '.join(XTD_LANGUAGES)}")


class LazyEncoder:
    """`encode(items)` of an `Embedder` that is built on the first call only."""

    def __init__(self, args):
        self.args = args
        self.embedder = None

    def __call__(self, items):
        if self.embedder is None:
            self.embedder = self._build()
        return self.embedder.encode(items, progress=False)

    def _build(self):
        import jax

        from mme5_jax.embedder import Embedder
        from mme5_jax.sharding import make_mesh

        a = self.args
        mesh = make_mesh(data=-1, fsdp=a.fsdp, tensor=a.tensor) if jax.device_count() > 1 else None
        return Embedder.from_pretrained(a.model, a.dtype, bos=a.bos, max_length=a.max_length,
                                        batch_size=a.batch_size, mesh=mesh, progress=True)


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def run(args):
    try:
        return _run(args)
    except (DataError, FileNotFoundError) as err:
        print(f"mme5 eval: error: {err}", file=sys.stderr)
        return 2


def _run(args):
    for flag, path in (("--data", args.data), ("--model", args.model), ("--image-root", args.image_root)):
        if path is not None and not os.path.isdir(path):
            raise DataError(f"{flag} {path} is not a directory")
    if args.benchmark == "mmeb":
        select_subsets(args.data, args.datasets, MMEB_SUBSETS, "MMEB datasets")  # fail before hashing the model
    else:
        select_subsets(args.data, args.languages, XTD_LANGUAGES, "XTD languages")
    settings = {"dtype": args.dtype, "bos": args.bos, "max_length": args.max_length}
    cache, fingerprint = None, None
    if not args.no_cache:
        cache_dir = args.cache_dir or default_cache_dir()
        fingerprint = model_fingerprint(args.model, settings, cache_dir)
        cache = EmbeddingCache(cache_dir, fingerprint)
    encoder = LazyEncoder(args)
    chunk_size = max(1024, 64 * args.batch_size)
    common = dict(image_root=args.image_root, cache=cache, chunk_size=chunk_size, progress=True)
    if args.benchmark == "mmeb":
        results = evaluate_mmeb(encoder, args.data, datasets=args.datasets, **common)
        render, headline = mmeb_markdown, f"overall {results['overall']}"
    else:
        results = evaluate_xtd(encoder, args.data, languages=args.languages, **common)
        render, headline = xtd_markdown, f"average recall@10 {results['average']['recall@10']}"
    results.update(model=os.path.abspath(args.model), model_fingerprint=fingerprint, settings=settings)
    _write_atomic(args.output, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    markdown = render(results, os.path.basename(os.path.normpath(args.model)))
    markdown_path = args.markdown or os.path.splitext(args.output)[0] + ".md"
    _write_atomic(markdown_path, markdown)
    print(markdown)
    print(f"{args.benchmark}: {headline}; wrote {args.output} and {markdown_path}")
    return 0
