"""The training loop: one jitted step per batch, checkpoints and held-out evaluations at their intervals.

Step metrics are fetched one step late, so the host never waits for the device before dispatching the next step.
"""
import json
import logging
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils
from tqdm import tqdm

from mme5_jax import runtime, train_step
from mme5_jax.data import pipeline
from mme5_jax.train import build, checkpoints, startup
from mme5_jax.train.config import TrainConfigError
from mme5_jax.train.heldout import HeldoutEval
from mme5_jax.train.metrics import MetricsLog, plot_curves

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss or gradient (each one was skipped)."""


def train(config):
    """Run (or resume) training as configured; returns a summary of the final state."""
    startup.start(config)
    primary = jax.process_index() == 0
    output_dir = Path(config.output_dir)
    startup.ensure_demo_inputs(config)
    config = build.plan_steps(config, warn=primary)
    t, batch_size = config.train, config.data.global_batch_size
    mesh = build.run_mesh(config)
    run_checkpoints = checkpoints.RunCheckpoints(output_dir / "checkpoints", config.checkpoint)
    start = run_checkpoints.latest_step()
    resumed = None if start is None else run_checkpoints.data_position(start, batch_size)
    if resumed is not None and resumed.global_batch_size != batch_size:
        raise TrainConfigError(f"data.global_batch_size: {batch_size}, but the checkpoint at step {start} in "
                                     f"{output_dir} trained with {resumed.global_batch_size}; resume with that, or "
                                     f"start a new output_dir")
    if primary:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")

    _, model = build.build_model(config, config.model.path or checkpoints.save_random_base(config, output_dir))
    optimizer = train_step.make_optimizer(train_step.make_schedule(t.schedule, t.lr, t.steps, t.warmup_ratio),
                                          weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps,
                                          clip_norm=t.clip_norm)
    graphdef, state = train_step.init_train_state(model, optimizer, mesh)
    del model
    step_fn = train_step.TrainStep(graphdef, optimizer, mesh, temperature=t.temperature, chunk_size=t.chunk_size,
                                   contrastive_group=t.contrastive_group)

    data_config = build.pipeline_config(config)
    position = 0 if resumed is None else resumed.position
    layout = pipeline.image_layout(mesh, batch_size, t.chunk_size, t.contrastive_group)
    iterator = iter(pipeline.make_dataset(data_config, build.train_record_sets(config), jax.process_index(),
                                          jax.process_count(), position=position, layout=layout))
    pad_token_id = build.pad_token_id(data_config)
    if resumed is not None:
        state = run_checkpoints.restore(start, state)
        if primary:  # the counts so far are the whole run's; every process adds its own from here on
            pipeline.find_counter(iterator).restore_counts({"rejected": resumed.rejected, "notes": resumed.notes})
        log.info("resumed from step %d at entry %d of the data", start, position)
    start = start or 0

    def data_position(done):
        return checkpoints.DataPosition(position + (done - start) * batch_size, batch_size,
                                        **_problems_of_all_processes(iterator))

    heldout = build.heldout_record_set(config)
    evaluate = None if heldout is None or config.eval.every_steps < 0 else \
        HeldoutEval(config, mesh, graphdef, heldout)
    metrics_log = MetricsLog(output_dir, config.log, primary)
    progress = tqdm(total=t.steps, initial=start, desc="train", unit="step",
                    disable=not (primary and config.log.progress))
    step_log = StepLog(config, metrics_log, progress, int(jax.device_get(state.nonfinite_steps)))
    base_key = jax.random.key(config.seed)
    summary = {"start_step": start}

    def run_eval(step):
        results = evaluate(state)
        metrics_log.write(step, "eval", results)
        progress.write(f"step {step}: held-out recall@1 {results['recall@1']:.3f} "
                       f"({results['num_queries']} queries, {results['num_candidates']} candidates)")
        summary.setdefault("eval", []).append({"step": step, **results})

    try:
        if evaluate is not None and start == 0:
            run_eval(0)
        with runtime.PreemptionNotice() as preemption:
            for step in range(start, t.steps):
                host_batch = next(iterator)
                batch = pipeline.to_global_batch(host_batch, mesh, pad_token_id)
                if config.log.example_ids:  # in global batch order (the pipeline balances images over devices)
                    order = np.argsort(_global_rows(batch["row_index"]))
                    metrics_log.write(step + 1, "examples", {key: _global_rows(batch[key])[order].tolist()
                                                             for key in ("source_index", "record_index")})
                state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
                step_log.add(step, metrics, _tokens(host_batch))
                done = step + 1
                saved = done % config.checkpoint.every_steps == 0 or done == t.steps
                if saved:
                    run_checkpoints.save(done, state, data_position(done))
                if evaluate is not None and (done == t.steps or (config.eval.every_steps > 0
                                                                 and done % config.eval.every_steps == 0)):
                    step_log.flush()
                    run_eval(done)
                if done < t.steps and preemption.reached(done):
                    if not saved:
                        run_checkpoints.save(done, state, data_position(done))
                    summary["preempted"] = True
                    log.warning("preemption notice (SIGTERM): checkpoint at step %d; the same command resumes", done)
                    break
        step_log.flush()
    finally:
        progress.close()
        run_checkpoints.finish()
        metrics_log.close()
    if primary:
        plot_curves(output_dir)
    if step_log.last is not None:
        summary["last"] = step_log.last
    summary.update(step=int(jax.device_get(state.step)), nonfinite_steps=step_log.nonfinite_steps,
                   data=_problems_of_all_processes(iterator), state=state)
    return summary


def _global_rows(array):
    """A row-sharded global `jax.Array` as one numpy array on every process."""
    return multihost_utils.process_allgather(array, tiled=True) if jax.process_count() > 1 else np.asarray(array)


def _problems_of_all_processes(iterator):
    """The pipeline's counts by reason (`pipeline.problem_report`), summed over processes: each counts its own."""
    report = pipeline.problem_report(iterator)
    if jax.process_count() == 1:
        return report
    encoded = np.frombuffer(json.dumps(report).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(len(encoded)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(encoded)] = encoded
    totals = {key: Counter() for key in report}
    for row, size in zip(multihost_utils.process_allgather(padded), sizes):
        for key, counts in json.loads(bytes(row[:size])).items():
            totals[key].update(counts)
    return {key: dict(sorted(counts.items())) for key, counts in totals.items()}


class StepLog:
    """Each step's metrics, reported when the next step has been dispatched (or on `flush`): to metrics.jsonl and
    TensorBoard every `log.every_steps` steps and at the last, and to the progress bar. Stops the run once
    `train.max_nonfinite_steps` steps were skipped."""

    def __init__(self, config, metrics_log, progress, nonfinite_steps):
        self.config, self.metrics_log, self.progress = config, metrics_log, progress
        self.nonfinite_steps = nonfinite_steps
        self.pending = self.last = None
        self.last_ready = time.perf_counter()

    def add(self, step, metrics, tokens):
        """Hold step `step`'s metrics (still on device) and report the step before it."""
        self.flush()
        self.pending = (step, metrics, tokens)

    def flush(self):
        if self.pending is None:
            return
        (step, metrics, tokens), self.pending = self.pending, None
        t = self.config.train
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        seconds, self.last_ready = now - self.last_ready, now
        values["examples_per_s"] = self.config.data.global_batch_size / seconds
        values["tokens_per_s_per_chip"] = tokens / seconds / jax.local_device_count()
        values["nonfinite_steps"] = int(values["nonfinite_steps"])
        if values["nonfinite_steps"] > self.nonfinite_steps:
            self.progress.write(f"step {step}: non-finite loss or gradient, update skipped "
                                f"({values['nonfinite_steps']} so far)")
        self.nonfinite_steps = values["nonfinite_steps"]
        if (step + 1) % self.config.log.every_steps == 0 or step + 1 == t.steps:
            self.metrics_log.write(step + 1, "train", values)
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}", refresh=False)
        self.progress.update(1)
        self.last = values
        if self.nonfinite_steps >= t.max_nonfinite_steps:
            raise NonFiniteLossError(f"stopping at step {step + 1}: {self.nonfinite_steps} steps had a non-finite "
                                     f"loss or gradient (train.max_nonfinite_steps={t.max_nonfinite_steps})")


def _tokens(host_batch):
    return int(sum(host_batch[g]["attention_mask"].sum() for g in ("query", "positive", "negatives")))
