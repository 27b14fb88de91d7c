"""Markdown reports of results.json: our row beside the published mmE5 numbers in the paper's layout, then one
row per dataset or language with its denominator and skipped rows. Scores are printed as percentages."""
from mme5_jax.eval.catalog import (META_TASK_HEADERS, META_TASKS, MMEB_PUBLISHED, XTD_KS, XTD_LANGUAGES,
                                   XTD_PUBLISHED_R10)


def _pct(value, scale=100.0) -> str:
    return "–" if value is None else f"{value * scale:.1f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _skipped(entry) -> str:
    if not entry["skipped"]:
        return "0"
    reasons = ", ".join(f"{reason} {count}" for reason, count in entry["skipped_reasons"].items())
    return f"{entry['skipped']} ({reasons})"


def mmeb_markdown(results: dict, model_name: str) -> str:
    columns = [*META_TASKS, "ind", "ood", "overall"]
    ours = [results["meta_tasks"][t] for t in META_TASKS] + [results["ind"], results["ood"], results["overall"]]
    rows = [[f"**{model_name}** (this run)", *(_pct(v) for v in ours)]]
    rows += [[name, *(_pct(published[c], 1.0) for c in columns)] for name, published in MMEB_PUBLISHED.items()]
    header = ["Model", *(META_TASK_HEADERS[t] for t in META_TASKS), "IND", "OOD", "All"]
    lines = ["## MMEB (Precision@1, %)", "", *_table(header, rows), ""]
    coverage = results["coverage"]
    if coverage["overall"][0] < coverage["overall"][1]:
        parts = ", ".join(f"{g} {k}/{n}" for g, (k, n) in coverage.items())
        lines += [f"Partial run: averages cover {parts} datasets. Missing: {', '.join(results['missing']) or '–'}.",
                  ""]
    per_dataset = [[name, e["meta_task"], e["split"].upper(), _pct(e["precision@1"]), e["n"], _skipped(e)]
                   for name, e in results["datasets"].items()]
    lines += ["### Per dataset", "", *_table(["Dataset", "Meta-task", "Split", "P@1", "n", "Skipped"], per_dataset)]
    return "\n".join(lines) + "\n"


def xtd_markdown(results: dict, model_name: str) -> str:
    languages = results["languages"]
    ours = [_pct(languages[lang]["recall@10"]) if lang in languages else "–" for lang in XTD_LANGUAGES]
    rows = [[f"**{model_name}** (this run)", *ours, _pct(results["average"]["recall@10"])]]
    rows += [[name, *(_pct(published.get(c), 1.0) for c in [*XTD_LANGUAGES, "average"])]
             for name, published in XTD_PUBLISHED_R10.items()]
    lines = ["## XTD-10 text-to-image (Recall@10, %)", "", *_table(["Model", *XTD_LANGUAGES, "Avg"], rows), ""]
    scored, defined = results["coverage"]
    if scored < defined:
        lines += [f"Partial run: the average covers {scored}/{defined} languages. "
                  f"Missing: {', '.join(results['missing'])}.", ""]
    per_language = [[lang, *(_pct(e[f"recall@{k}"]) for k in XTD_KS), e["n"], _skipped(e)]
                    for lang, e in languages.items()]
    lines += ["### Per language", "",
              *_table(["Language", *(f"R@{k}" for k in XTD_KS), "n", "Skipped"], per_language)]
    return "\n".join(lines) + "\n"
