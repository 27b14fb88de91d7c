"""The synthesis configuration files (bundled `synth/`): defaults, language weights and prices, and the schema of
a run's settings (defaults.yaml under the flags), validated like every other config by `mme5_jax.yaml_config`.

They ship with the package next to the other configs; `--config-dir` points at an edited copy.
"""
import dataclasses
import os
from pathlib import Path

from mme5_jax import yaml_config
from mme5_jax.configs import bundled_config

CONFIG_DIR = bundled_config("synth")
MODES = ("online", "batch")
IMAGE_DETAILS = ("low", "high", "auto")  # the OpenAI API's image detail levels


class SynthConfigError(yaml_config.ConfigError):
    """A bad synthesis setting; the message names the key."""


@dataclasses.dataclass(frozen=True)
class SynthSettings:
    """The settings of one run: defaults.yaml's keys (the file holds their defaults, see its comments), then the
    run's own, each overridden by the `mme5-synth run` flag of the same name."""

    model: str
    api_key_env: str
    seed: int
    concurrency: int
    requests_per_minute: int
    tokens_per_minute: int
    max_attempts: int
    request_timeout_s: float
    max_completion_tokens: int
    expected_completion_tokens: int
    temperature: float
    image_detail: str
    image_max_side: int
    negative_rank: int
    dedup_threshold: float
    records_per_shard: int
    tasks: dict
    batch_max_requests: int
    batch_max_bytes: int
    batch_poll_s: float
    images: str | os.PathLike
    out: str | os.PathLike
    num_samples: int
    config_dir: str | os.PathLike | None = None
    max_cost_usd: float | None = None
    languages: str | None = None
    base_url: str | None = None
    mode: str = "online"
    image_index: str | None = None
    embedder: str | None = None
    retry_parked: bool = False
    dry_run: bool = False
    progress: bool = True
    backoff_base_s: float = 1.0


SETTINGS_RULES = yaml_config.Rules(
    choices={"mode": MODES, "image_detail": IMAGE_DETAILS},
    positive=frozenset({"concurrency", "max_attempts", "records_per_shard", "batch_max_requests"}))


def _load(name, config_dir=None):
    path = Path(config_dir or CONFIG_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(f"synthesis config {path} not found (--config-dir names a folder holding "
                                f"defaults.yaml, languages.yaml and prices.yaml, like the bundled {CONFIG_DIR})")
    try:
        return yaml_config.read_yaml(path)
    except yaml_config.ConfigError as err:
        raise SynthConfigError(str(err)) from None


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
                         f"known codes are in languages.yaml of --config-dir (default {CONFIG_DIR})")
    chosen = {c: dict(languages[c]) for c in languages if c in wanted}
    total = sum(lang["weight"] for lang in chosen.values())
    for lang in chosen.values():
        lang["weight"] /= total
    return chosen


def load_prices(config_dir=None):
    return _load("prices.yaml", config_dir)
