"""Import speed: rows/s and peak memory of `mme5 data import` on a generated parquet in mmE5's released layout.

The parquet has the released columns (`qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path`)
plus the synthetic set's `modality` codes (T2I, IT2IT, ...) and `task` labels; image-bearing texts start with
`<|image_1|>\\n`, every text ends in `\\n`, negatives are stringified Python lists. Its image paths name real
files spread over nested folders, reached through a link under the image root, as the 1 TB image set is mounted;
every 200th row names a missing image, so skips are exercised too. Image checks are on.

The importer and a plain pyarrow read of the same file (batches converted to Python rows, nothing else) each run
in a fresh child process that reports its time and its resident-set high-water mark; the pyarrow read is the
floor any importer pays, so the ratio of the two still compares on a busy machine.

    python tools/bench_import.py --rows 20000
    python tools/bench_import.py --keep /data/bench_import --output import.json    # 1M rows; data kept for reuse
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


IMG = "<|image_1|>\n"
# (released modality code, task, query template, target template); `{}` takes the row number.
KINDS = (
    ("T2I", "Retrieval", "Find me an everyday image that matches the given caption: a scene numbered {}.",
     "Represent the given image."),
    ("I2T", "Classification", "Represent the given image for classification.", "class {}"),
    ("IT2T", "VQA", "Represent the given image with the following question: what is shown in picture {}?",
     "an answer about picture {}"),
    ("IT2I", "Retrieval", "Find an image like this one, but at night: view {}.", "Represent the given image."),
    ("I2I", "Retrieval", "Represent the given image.", "Represent the given image."),
    ("IT2IT", "Retrieval", "Find a news image that matches: headline {}", "A news photo with caption {}."),
    ("T2IT", "Retrieval", "Find a Wikipedia image that answers this question: question {}?",
     "Represent the given Wikipedia image with related text information: title {}"),
)
NEGATIVES = 3
MISSING_EVERY = 200
BATCH_ROWS = 65536


def image_path(j):
    """The j-th image, 16 to a folder, 256 folders in two levels, under the linked `laion` folder."""
    return f"laion/{j % 16:02x}/{j // 16 % 16:02x}/{j:07d}.jpg"


def write_images(mount, count):
    """`count` tiny JPEG files under `mount` (the same bytes each: the importer only checks that they exist)."""
    import io

    from PIL import Image
    from tqdm import tqdm

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 90, 160)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    for j in tqdm(range(count), desc="images", unit="file"):
        path = os.path.join(mount, image_path(j).split("/", 1)[1])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def side(code, text, i, image):
    """A released text (image token in front when the side has an image, newline at the end) and image path."""
    has_image = "I" in code
    return (IMG if has_image else "") + text.format(i) + "\n", image if has_image else ""


def make_row(i, images):
    code, task, query, target = KINDS[i % len(KINDS)]
    query_code, target_code = code.split("2")
    missing = f"laion/missing/{i:07d}.jpg" if i % MISSING_EVERY == MISSING_EVERY - 1 else None
    qry, qry_image = side(query_code, query, i, missing or image_path(i % images))
    pos, pos_image = side(target_code, target, i, missing or image_path((i + 1) % images))
    negatives = [side(target_code, target, f"{i}-{n}", image_path((i + 2 + n) % images)) for n in range(NEGATIVES)]
    return {"qry": qry, "qry_image_path": qry_image, "pos_text": pos, "pos_image_path": pos_image,
            "neg_text": str([t for t, _ in negatives]), "neg_image_path": str([p for _, p in negatives]),
            "modality": code, "task": task}


def write_parquet(path, rows, images):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    writer = None
    with tqdm(total=rows, desc="parquet", unit="row") as bar:
        for start in range(0, rows, BATCH_ROWS):
            batch = [make_row(i, images) for i in range(start, min(rows, start + BATCH_ROWS))]
            table = pa.Table.from_pylist(batch)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            bar.update(len(batch))
    writer.close()


def prepare(workdir, rows, images):
    """The parquet and the image tree under `workdir`, reused when a previous run made the same ones."""
    manifest_path = os.path.join(workdir, "manifest.json")
    manifest = {"rows": rows, "images": images}
    parquet = os.path.join(workdir, "released", "train-00000-of-00001.parquet")
    image_root = os.path.join(workdir, "image_root")
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            if json.load(f) == manifest:
                print(f"reusing the data in {workdir}")
                return parquet, image_root
        raise SystemExit(f"{workdir} holds data for another --rows/--images ({manifest_path}); pass a fresh --keep")
    if os.path.exists(workdir) and os.listdir(workdir):
        raise SystemExit(f"--keep {workdir} exists and is not a previous run's directory; pass a fresh one")
    mount = os.path.join(workdir, "mounted_images")
    os.makedirs(os.path.dirname(parquet))
    os.makedirs(image_root)
    write_images(mount, images)
    os.symlink(mount, os.path.join(image_root, "laion"))
    write_parquet(parquet, rows, images)
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return parquet, image_root


def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind, parquet, image_root, out_dir):
    """One measured read in this fresh process; both kinds import the same modules before the baseline."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from mme5_jax.data.importer import import_parquet

    baseline = rss_bytes("VmRSS")
    start = time.perf_counter()
    if kind == "import_parquet":
        summary = import_parquet([parquet], image_root, out_dir, progress=True)
        result = {"rows": summary["rows"], "kept": summary["kept"], "skipped": summary["skipped"]}
    else:
        parquet_file, rows = pq.ParquetFile(parquet), 0
        with tqdm(total=parquet_file.metadata.num_rows, desc="pyarrow", unit="row") as bar:
            for batch in parquet_file.iter_batches(batch_size=2048):
                rows += len(batch.to_pylist())
                bar.update(batch.num_rows)
        result = {"rows": rows}
    seconds = time.perf_counter() - start
    return {**result, "seconds": seconds, "rows_per_s": result["rows"] / seconds, "baseline_rss": baseline,
            "peak_rss": rss_bytes("VmHWM")}


def run_child(kind, parquet, image_root, out_dir):
    """`child` in a fresh interpreter; its progress bar shows on stderr, its result comes back on stdout."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, parquet, image_root, out_dir],
                         stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="parquet rows (1,000,000)")
    parser.add_argument("--images", type=int, default=4096, help="distinct image files (4096)")
    parser.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it (parquet, images, records); "
                                                      "a later run with the same --rows/--images reuses the data")
    parser.add_argument("--output", default="bench_import.json", help="results as JSON (bench_import.json)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "PARQUET", "ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if args.rows < 1 or args.images < NEGATIVES + 2:
        parser.error(f"--rows must be >= 1 and --images >= {NEGATIVES + 2}")

    workdir = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="bench_import_")
    try:
        start = time.perf_counter()
        parquet, image_root = prepare(workdir, args.rows, args.images)
        parquet_bytes = os.path.getsize(parquet)
        print(f"data: {args.rows} rows ({parquet_bytes / 1e6:.1f} MB parquet), {args.images} images "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        records = os.path.join(workdir, "records")
        shutil.rmtree(records, ignore_errors=True)
        results = {kind: run_child(kind, parquet, image_root, records) for kind in ("pyarrow", "import_parquet")}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'':<16}{'rows':>10}{'seconds':>10}{'rows/s':>10}{'peak RSS MB':>13}{'above start MB':>16}")
    for kind, r in results.items():
        print(f"{kind:<16}{r['rows']:>10}{r['seconds']:>10.2f}{r['rows_per_s']:>10.0f}{r['peak_rss'] / 1e6:>13.0f}"
              f"{(r['peak_rss'] - r['baseline_rss']) / 1e6:>16.0f}")
    importer, floor = results["import_parquet"], results["pyarrow"]
    ratio = importer["seconds"] / floor["seconds"]
    print(f"import_parquet takes {ratio:.1f}x the pyarrow read; kept {importer['kept']} rows, "
          f"skipped {importer['skipped']}")
    report = {"rows": args.rows, "images": args.images, "parquet_bytes": parquet_bytes, "cpu_count": os.cpu_count(),
              "kept_dir": args.keep,
              "results": results, "import_time_vs_pyarrow": ratio}
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
