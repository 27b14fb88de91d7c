"""`mme5 data import|stats`: bring released mmE5 data into the record format, and look inside a record set."""
import json
import sys
from collections import Counter
from pathlib import Path

from mme5_jax.records import read_records


def record_set_stats(record_dir, check_images=False):
    """Counts by task, modality, language and source, negatives per record, text lengths and image use."""
    record_dir = Path(record_dir)
    summary_path = record_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    image_root = record_dir / summary.get("image_root", ".")
    counts = {key: Counter() for key in ("task", "modality", "language", "source")}
    negatives, text_chars, images, missing = Counter(), Counter(), set(), []
    num_records = 0
    for record in read_records(record_dir):
        num_records += 1
        for key in counts:
            counts[key][record[key]] += 1
        negatives[len(record["neg_text"])] += 1
        for text in [record["qry_text"], record["pos_text"], *record["neg_text"]]:
            text_chars["max"] = max(text_chars["max"], len(text))
            text_chars["total"] += len(text)
            text_chars["texts"] += 1
        images.update(p for p in [record["qry_image"], record["pos_image"], *record["neg_image"]] if p)
    if check_images:
        missing = sorted(p for p in images if not (image_root / p).is_file())
    stats = {
        "records": num_records,
        **{f"by_{key}": dict(sorted(c.items())) for key, c in counts.items()},
        "negatives_per_record": {str(k): v for k, v in sorted(negatives.items())},
        "text_chars": {"mean": round(text_chars["total"] / max(text_chars["texts"], 1), 1), "max": text_chars["max"]},
        "distinct_images": len(images),
        "image_root": str(image_root),
    }
    if check_images:
        stats["missing_images"] = {"count": len(missing), "first": missing[:10]}
    imported = {k: summary[k] for k in ("rows", "kept", "rows_repaired", "skipped", "repaired") if k in summary}
    if imported:
        stats["import_summary"] = imported
    return stats


def add_arguments(parser):
    sub = parser.add_subparsers(dest="data_command", metavar="{import,stats}", required=True)
    imp = sub.add_parser("import", help="convert released mmE5 parquet files into record shards + summary.json",
                         description="Convert parquet in the released mmE5 layout (qry, qry_image_path, pos_text, "
                                     "pos_image_path, neg_text, neg_image_path, optionally modality, task, language) "
                                     "into record shards. Defective rows are repaired or skipped and counted by "
                                     "reason in OUT/summary.json, with every released label that disagrees with "
                                     "its row's content.")
    imp.add_argument("parquet", nargs="+", metavar="PARQUET", help="released parquet files")
    imp.add_argument("--image-root", required=True, metavar="DIR", help="directory the image paths are relative to")
    imp.add_argument("--out", required=True, metavar="DIR", help="empty or new directory for the record set")
    imp.add_argument("--source", help="source name for every record (default: the subset named in each file's path, "
                                      "else the file stem)")
    imp.add_argument("--task", choices=("classification", "vqa", "retrieval"),
                     help="task for every record (default: known from the subset name, else retrieval)")
    imp.add_argument("--language", default="en", help="language code when the data has no language column (en)")
    imp.add_argument("--no-check-images", action="store_true",
                     help="do not stat image files (paths escaping the root are still rejected)")
    imp.add_argument("--records-per-shard", type=int, default=10000, help="entries per ArrayRecord shard (10000)")
    imp.add_argument("--max-rows", type=int, metavar="N",
                     help="keep only the first N rows of each subset, in stored order; files of one subset (see "
                          "--source) count together, in the order given. mmE5 trains on the first 50000 of each "
                          "labelled subset. Default: all rows")
    stats = sub.add_parser("stats", help="print counts and sizes of a record set as JSON",
                           description="Print counts by task, modality, language and source of a record set, "
                                       "with its import summary when there is one.")
    stats.add_argument("record_dir", metavar="DIR", help="record set directory")
    stats.add_argument("--check-images", action="store_true", help="also report images missing under the image root")


def run(args):
    if args.data_command == "import":
        from mme5_jax.data.importer import import_parquet

        try:
            summary = import_parquet(args.parquet, args.image_root, args.out, source=args.source, task=args.task,
                                     language=args.language, check_images=not args.no_check_images,
                                     records_per_shard=args.records_per_shard, max_rows=args.max_rows)
        except (OSError, ValueError) as err:  # a missing file or column, a bad --max-rows, a non-empty --out
            print(f"mme5 data import: error: {err}", file=sys.stderr)
            return 2
        print(json.dumps({k: summary[k] for k in ("rows", "kept", "rows_repaired", "skipped", "repaired", "labels")},
                         indent=2))
        print(f"wrote {summary['num_records']} records to {args.out}")
        return 0
    print(json.dumps(record_set_stats(args.record_dir, check_images=args.check_images), indent=2, ensure_ascii=False))
    return 0
