"""The synthesis configuration files (`configs/synth/`): defaults, language weights and prices.

They live in the repository's `configs/` so users edit one place; `--config-dir` points elsewhere.
"""
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "synth"


def _load(name, config_dir=None):
    path = Path(config_dir or CONFIG_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(f"synthesis config {path} not found (use --config-dir to point at configs/synth)")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_defaults(config_dir=None):
    return _load("defaults.yaml", config_dir)


def load_languages(config_dir=None):
    """Return {code: {"name", "script", "weight"}} in file order; weights are normalised to sum to 1."""
    rows = _load("languages.yaml", config_dir)["languages"]
    languages = {}
    for i, row in enumerate(rows):
        for key in ("code", "name", "script", "weight"):
            if key not in row:
                raise ValueError(f"languages.yaml entry #{i}: missing key {key!r}")
        if not isinstance(row["code"], str):
            raise ValueError(f"languages.yaml entry #{i}: code {row['code']!r} must be a string (quote it in YAML)")
        if row["code"] in languages:
            raise ValueError(f"languages.yaml entry #{i}: language code {row['code']!r} repeats")
        if not row["weight"] > 0:
            raise ValueError(f"languages.yaml entry #{i} ({row['code']}): weight must be > 0, got {row['weight']}")
        languages[row["code"]] = {"name": row["name"], "script": row["script"], "weight": float(row["weight"])}
    total = sum(lang["weight"] for lang in languages.values())
    for lang in languages.values():
        lang["weight"] /= total
    return languages


def select_languages(languages, codes):
    """Restrict to a comma-separated list of codes (``--languages``), renormalising the weights."""
    if not codes:
        return languages
    wanted = [c.strip() for c in codes.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in languages]
    if unknown:
        raise ValueError(f"--languages: unknown language code(s) {', '.join(unknown)}; "
                         f"known codes are listed in configs/synth/languages.yaml")
    chosen = {c: dict(languages[c]) for c in languages if c in wanted}
    total = sum(lang["weight"] for lang in chosen.values())
    for lang in chosen.values():
        lang["weight"] /= total
    return chosen


def load_prices(config_dir=None):
    return _load("prices.yaml", config_dir)
