"""One synthesis run: resolve settings, build the pool and the plan, send what is left, write the output.

A run directory is identified by its plan. Rerunning the same command in the same `--out` continues it:
the journal says which samples are finished, parked or sitting in an open batch, and only the rest are
requested. Records are rewritten from the journal at the end, sorted by id, so the shards are a pure
function of (plan, replies) however often the run was interrupted.
"""
import asyncio
import fcntl
import json
import os
from collections import Counter
from pathlib import Path

from data_synth.config import (CONFIG_DIR, SETTINGS_RULES, SynthConfigError, SynthSettings, load_defaults,
                               load_languages, load_prices, select_languages)
from data_synth.images import ImagePool, export_tfds
from data_synth.journal import RUN_FILE, Journal, read_journal
from data_synth.ledger import Price
from data_synth.output import finalize, write_summary
from data_synth.plan import make_plan, plan_digest
from data_synth.prompts import PROMPT_VERSION, build_request
from mme5_jax import yaml_config

LOCK_FILE = ".lock"   # flock-ed while a run is going on; the kernel drops it when the process dies
# Settings that shape the plan, kept in run.json: when a rerun's plan differs, the changed ones are named.
PLAN_KEYS = ("images", "num_samples", "seed", "languages", "model", "negative_rank", "image_detail",
             "image_max_side", "image_index", "embedder")


def resolve_settings(config_dir=None, **overrides):
    """defaults.yaml, overridden by every argument that is not None, validated as SynthSettings."""
    given = {key: value for key, value in overrides.items() if value is not None}
    values = {**load_defaults(config_dir), "config_dir": config_dir, **given}
    try:
        return yaml_config.build(SynthSettings, values, SETTINGS_RULES)
    except yaml_config.ConfigError as err:
        raise SynthConfigError(f"{err} (set in {Path(config_dir or CONFIG_DIR) / 'defaults.yaml'} or by a flag)") \
            from None


class Synthesis:
    def __init__(self, settings, sleep=asyncio.sleep):
        self.s = settings
        self.sleep = sleep
        self.out = Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        images = str(settings.images)
        self.image_root = export_tfds(images, self.out) if images.startswith("tfds:") else Path(images)
        self.languages = select_languages(load_languages(settings.config_dir), settings.languages)
        self.prices = load_prices(settings.config_dir)
        self.price = Price.for_model(self.prices, settings.model, batch=settings.mode == "batch")
        self.pool = ImagePool.build(self.image_root, index=settings.image_index, embedder=settings.embedder,
                                    cache_dir=self.out / "cache", num_neighbours=settings.negative_rank + 1,
                                    dedup_threshold=settings.dedup_threshold)
        self.specs = make_plan(settings.num_samples, self.pool, self.languages, settings.tasks,
                               seed=settings.seed, negative_rank=settings.negative_rank)
        self.digest = plan_digest(self.specs)

    def script(self, spec):
        return self.languages[spec.language]["script"]

    def request(self, spec):
        """(body, prompt-token bound, worst-case cost) of the request for `spec`."""
        s = self.s
        body, bound = build_request(spec, self.image_root, model=s.model,
                                    language_name=self.languages[spec.language]["name"], detail=s.image_detail,
                                    max_side=s.image_max_side, max_completion_tokens=s.max_completion_tokens,
                                    temperature=s.temperature)
        return body, bound, self.price.cost(bound, s.max_completion_tokens)

    def run_info(self):
        return {"plan": {k: getattr(self.s, k) if k != "images" else str(self.s.images) for k in PLAN_KEYS},
                "plan_digest": self.digest, "prompt_version": PROMPT_VERSION, "planned": len(self.specs),
                "max_cost_usd": self.s.max_cost_usd, "mode": self.s.mode, "base_url": self.s.base_url,
                "duplicate_images_removed": self.pool.duplicates}

    def _claim_out_dir(self):
        """Write run.json, or check that the existing one describes the same plan."""
        path = self.out / RUN_FILE
        info = self.run_info()
        if path.exists():
            previous = json.loads(path.read_text())
            if previous["plan_digest"] != self.digest:
                changed = [k for k in PLAN_KEYS if previous["plan"].get(k) != info["plan"][k]]
                raise ValueError(f"{self.out} holds a different run (plan differs in: "
                                 f"{', '.join(changed) or 'the images'}); use a new --out or the original arguments")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)

    def dry_run(self):
        """Cost estimate of the plan: the worst case the cap works with, and a typical case."""
        combos = Counter((s.task, s.modality) for s in self.specs)
        languages = Counter(s.language for s in self.specs)
        worst = typical = 0.0
        for spec in self.specs:
            body, bound, cost = self.request(spec)
            worst += cost
            typical += self.price.cost(_typical_prompt_tokens(body, bound), self.s.expected_completion_tokens)
        return {"samples": len(self.specs), "model": self.s.model, "mode": self.s.mode,
                "by_task_modality": {f"{t} {m}": n for (t, m), n in sorted(combos.items())},
                "by_language": dict(languages.most_common()),
                "estimated_cost_usd": round(typical, 2), "worst_case_cost_usd": round(worst, 2),
                "duplicate_images_removed": self.pool.duplicates}

    def run(self):
        """Synthesise what the journal does not hold yet; returns the summary dict."""
        with open(self.out / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"another mme5-synth run is using {self.out}; two runs in one directory "
                                   f"would pay for the same samples twice") from None
            return self._run_locked()

    def _run_locked(self):
        self._claim_out_dir()
        state = read_journal(self.out)
        state.ledger.cap_usd = self.s.max_cost_usd
        if state.open_batches() and self.s.mode != "batch":
            raise RuntimeError(f"{self.out} has batches still open; rerun with --mode batch to collect them "
                               f"(sending their samples online would pay for them twice)")
        todo = [s for s in self.specs if s.id not in state.done
                and (s.id not in state.parked or self.s.retry_parked)]
        stopped = None
        if todo:
            with Journal(self.out) as journal:
                for sample_id in list(state.parked) if self.s.retry_parked else ():
                    event = {"e": "unparked", "id": sample_id}
                    state.apply(event, journal.write(event))
                if self.s.mode == "batch":
                    from data_synth.batch import run_batch

                    stopped = asyncio.run(run_batch(self, todo, state, journal))
                else:
                    from data_synth.online import run_online

                    stopped = asyncio.run(run_online(self, todo, state, journal))
        finalize(self.out, self.specs, state, self.s.records_per_shard)
        return write_summary(self.out, self.run_info(), state, stopped)


def _typical_prompt_tokens(body, bound):
    """About 4 bytes per text token; the bound counts 1 byte per token, images exactly."""
    text_bytes = sum(len(part["text"].encode()) for m in body["messages"]
                     for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
                     if "text" in part)
    schema_bytes = len(json.dumps(body["response_format"]).encode())
    return bound - (text_bytes + schema_bytes) * 3 // 4
