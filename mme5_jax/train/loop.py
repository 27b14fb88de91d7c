"""The training loop: one jitted step per batch, checkpoints and held-out evaluations at their intervals.

Step metrics are fetched one step late, so the host never waits for the device before dispatching the next step.
"""
import logging
import time
from pathlib import Path

import jax
import yaml
from tqdm import tqdm

from mme5_jax import runtime, train_step
from mme5_jax.data import pipeline
from mme5_jax.train import build, checkpoints, startup
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
    if primary:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    t = config.train
    mesh = build.run_mesh(config)

    _, model = build.build_model(config, config.model.path or checkpoints.save_random_base(config, output_dir))
    optimizer = train_step.make_optimizer(train_step.make_schedule(t.schedule, t.lr, t.steps, t.warmup_ratio),
                                          weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps,
                                          clip_norm=t.clip_norm)
    graphdef, state = train_step.init_train_state(model, optimizer, mesh)
    del model
    step_fn = train_step.TrainStep(graphdef, optimizer, mesh, temperature=t.temperature, chunk_size=t.chunk_size,
                                   contrastive_group=t.contrastive_group)

    data_config = build.pipeline_config(config)
    iterator = iter(pipeline.make_dataset(data_config, build.train_record_sets(config), jax.process_index(),
                                          jax.process_count()))
    pad_token_id = build.pad_token_id(data_config)
    run_checkpoints = checkpoints.RunCheckpoints(output_dir / "checkpoints", config.checkpoint)
    start = run_checkpoints.latest_step()
    if start is not None:
        state = run_checkpoints.restore(start, state, iterator)
        log.info("resumed from step %d", start)
    start = start or 0

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
                state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
                step_log.add(step, metrics, _tokens(host_batch))
                done = step + 1
                saved = done % config.checkpoint.every_steps == 0 or done == t.steps
                if saved:
                    run_checkpoints.save(done, state, iterator)
                if evaluate is not None and (done == t.steps or (config.eval.every_steps > 0
                                                                 and done % config.eval.every_steps == 0)):
                    step_log.flush()
                    run_eval(done)
                if done < t.steps and preemption.reached(done):
                    if not saved:
                        run_checkpoints.save(done, state, iterator)
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
                   data=pipeline.problem_report(iterator), state=state)
    return summary


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
