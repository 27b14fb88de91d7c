"""Input-pipeline throughput: examples/s of `mme5_jax.data.pipeline` with 0, 1 and 2 worker processes.

Each example is a query, a positive and k=3 negatives, decoded and preprocessed exactly as for training.
The first batch (worker start-up, tokenizer load) is excluded. Speeds are reported as ratios against the
in-process run of the same invocation, so numbers from a busy machine still compare.

    python tools/bench_pipeline.py --tile-size 448 --batches 20
    python tools/bench_pipeline.py --processor-dir /path/to/Llama-3.2-11B-Vision --records /path/to/records

Without `--processor-dir` it writes a processor with the offline Llama-3 tokenizer (`mme5_jax.llama3_processor`).
"""
import argparse
import json
import os
import sys
import tempfile
import time


def measure(config, record_dirs, num_batches):
    from mme5_jax.data.pipeline import make_dataset, problem_report

    iterator = iter(make_dataset(config, record_dirs))
    next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(num_batches):
        batch = next(iterator)
        count += len(batch["record_index"])
    seconds = time.perf_counter() - start
    report = problem_report(iterator)
    iterator.close()
    return {"examples_per_s": count / seconds, "examples": count, "seconds": seconds, **report}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processor-dir", help="checkpoint or HF Mllama dir with tokenizer + preprocessor files")
    parser.add_argument("--tile-size", type=int, default=448, help="tile size of the default processor (448)")
    parser.add_argument("--records", nargs="*", help="record set dirs (default: a fresh demo dataset)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run (after one warm-up)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--read-threads", type=int, default=2, help="read-ahead threads per process (2)")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from mme5_jax.data.demo import build_demo_dataset
    from mme5_jax.data.pipeline import PipelineConfig
    from mme5_jax.llama3_processor import write_processor_dir

    scratch = tempfile.mkdtemp(prefix="bench_pipeline_")
    processor_dir = args.processor_dir
    if processor_dir is None:
        processor_dir = write_processor_dir(os.path.join(scratch, "processor"), image_size=args.tile_size)
    records = args.records
    if not records:
        needed = args.batch_size * (args.batches + 2) * max(1, max(args.workers))
        splits = build_demo_dataset(os.path.join(scratch, "demo"), num_train=needed, num_heldout=8, photos=True)
        records = [str(splits["train"]), str(splits["photos"])]
    results = {}
    for workers in args.workers:
        config = PipelineConfig(processor_dir=processor_dir, global_batch_size=args.batch_size, num_workers=workers,
                                num_epochs=None, read_threads=args.read_threads)
        results[workers] = measure(config, records, args.batches)
        print(f"workers={workers}: {results[workers]['examples_per_s']:.1f} examples/s "
              f"({results[workers]['examples']} examples in {results[workers]['seconds']:.1f} s)", flush=True)
    base = results[args.workers[0]]["examples_per_s"]
    for workers, result in results.items():
        result["ratio_vs_first"] = result["examples_per_s"] / base
        print(f"workers={workers}: {result['ratio_vs_first']:.2f}x workers={args.workers[0]}")
    summary = {"tile_size": args.tile_size, "batch_size": args.batch_size, "read_threads": args.read_threads,
               "records": records,
               "cpu_count": os.cpu_count(), "results": results}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
