"""A short `mme5 train` run in-process: it learns, logs (JSONL, TensorBoard, PNG), and stops on non-finite losses."""
import json

import numpy as np
import pytest

from train_fixtures import make_inputs, write_config

import mme5_jax.data.pipeline as pipeline
from mme5_jax.train import NonFiniteLossError, load_config, read_metrics, train



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("run"))


def test_short_run_learns_and_logs(inputs):
    config = load_config(write_config(inputs, "learn", {
        "train": {"steps": 24}, "checkpoint": {"every_steps": 12},
        "eval": {"every_steps": 0, "max_examples": 64, "batch_size": 32}}))
    summary = train(config)
    out = inputs / "learn"
    records = read_metrics(out)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 25))
    for key in ("loss", "accuracy", "grad_norm", "lr", "examples_per_s", "tokens_per_s_per_chip"):
        assert all(np.isfinite(r[key]) for r in train_records), key
    losses = [r["loss"] for r in train_records]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.5
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 24]
    assert all(r["num_queries"] == 64 and 0 <= r["recall@1"] <= 1 for r in evals)
    assert (out / "curves.png").stat().st_size > 10_000
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["kind"] == "eval"
    assert summary["nonfinite_steps"] == 0
    # Relaunching a finished run does nothing but report the final state.
    again = train(config)
    assert again["start_step"] == 24 and again["step"] == summary["step"]


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(inputs, monkeypatch):
    """From the third batch on the pixels are NaN: those updates are skipped; the run stops after 3 of them."""
    to_global_batch = pipeline.to_global_batch
    calls = []

    def poisoned(host_batch, mesh, pad_token_id):
        calls.append(1)
        if len(calls) >= 3:
            images = host_batch["images"]
            assert images["pixel_values"].size  # the demo's batches all hold images
            poison = np.full_like(images["pixel_values"], np.nan)
            host_batch = dict(host_batch, images=dict(images, pixel_values=poison))
        return to_global_batch(host_batch, mesh, pad_token_id)

    monkeypatch.setattr(pipeline, "to_global_batch", poisoned)
    config = load_config(write_config(inputs, "nan", {"train": {"steps": 20, "max_nonfinite_steps": 3},
                                                      "checkpoint": {"every_steps": 100}}))
    with pytest.raises(NonFiniteLossError, match=r"3 steps had a non-finite loss.*max_nonfinite_steps=3"):
        train(config)
    records = [r for r in read_metrics(inputs / "nan") if r["kind"] == "train"]
    assert list(np.diff([0] + [r["nonfinite_steps"] for r in records[:5]])) == [0, 0, 1, 1, 1]
    assert [r["nonfinite_steps"] for r in records[:5]] == [0, 0, 1, 2, 3]
    assert np.isnan(records[2]["loss"]) and np.isfinite(records[1]["loss"])


def test_contrastive_group_reaches_the_step_and_must_divide_the_batch(inputs, monkeypatch):
    import mme5_jax.train_step as train_step
    from mme5_jax.train import TrainConfigError

    class Built(Exception):
        """Stops the run once the step is built."""

    def recording(*args, contrastive_group, **kwargs):
        groups.append(contrastive_group)
        raise Built

    groups = []
    monkeypatch.setattr(train_step, "TrainStep", recording)
    with pytest.raises(Built):
        train(load_config(write_config(inputs, "group", {"train": {"contrastive_group": 4}})))
    assert groups == [4]
    with pytest.raises(TrainConfigError, match="train.contrastive_group: must divide data.global_batch_size=16, "
                                               "got 5"):
        load_config(write_config(inputs, "group", {"train": {"contrastive_group": 5}}))
    with pytest.raises(TrainConfigError, match="train.contrastive_group: must be > 0"):
        load_config(write_config(inputs, "group", {"train": {"contrastive_group": 0}}))


def _text_pairs(path, count, offset=0):
    from mme5_jax.records import ShardWriter

    colors, things = ["red", "green", "blue", "black"], ["cup", "car", "kite", "shoe", "lamp", "door", "boat", "hat"]
    with ShardWriter(path) as writer:
        for i in range(offset, offset + count):
            color, thing = colors[i % 4], things[(i // 4) % 8]
            writer.write({"id": f"tt-{i}", "source": "text", "task": "retrieval", "modality": "T->T",
                          "language": "en", "qry_text": f"Find the description of this object: a {color} {thing}\n",
                          "qry_image": None, "pos_text": f"{thing}, {color}\n", "pos_image": None,
                          "neg_text": [f"{thing}, {colors[(i + 1) % 4]}\n"], "neg_image": [None]})
    return str(path)


def test_text_only_pairs_train_and_evaluate(inputs):
    train_set = _text_pairs(inputs / "text-train", 64)
    heldout = _text_pairs(inputs / "text-heldout", 32, offset=64)
    config = load_config(write_config(inputs, "text", {
        "data": {"train": [train_set], "heldout": heldout, "num_negatives": 1},
        "train": {"steps": 2}, "eval": {"every_steps": 0, "max_examples": 32, "batch_size": 16}}))
    summary = train(config)
    assert summary["step"] == 2 and summary["data"]["rejected"] == {}
    evals = [r for r in read_metrics(inputs / "text") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and all(r["num_queries"] == 32 for r in evals)
    assert all(np.isfinite(r["loss"]) for r in read_metrics(inputs / "text") if r["kind"] == "train")


def test_heldout_recall_is_what_mme5_eval_gives_the_checkpoint(inputs):
    """The recall@1 a run logs at its end is the one the eval harness gives its saved adapters, encoded as
    `mme5 eval` encodes (an Embedder on a mesh of all devices) and scored on the same held-out records."""
    import itertools

    import jax
    from flax import nnx

    from mme5_jax.data.mixture import RecordSet
    from mme5_jax.embedder import Embedder
    from mme5_jax.eval import evaluate_sets, set_from_records
    from mme5_jax.export import load_run_model
    from mme5_jax.processing import MllamaInputProcessor
    from mme5_jax.records import read_records
    from mme5_jax.sharding import make_mesh, state_shardings

    config = load_config(write_config(inputs, "agree", {
        "model": {"init": "lecun"}, "train": {"steps": 16}, "checkpoint": {"every_steps": 8},
        "eval": {"every_steps": 0, "max_examples": 48, "batch_size": 16}}))
    train(config)
    logged = [r for r in read_metrics(inputs / "agree") if r["kind"] == "eval"]
    assert [r["step"] for r in logged] == [0, 16]

    _, _, model, step = load_run_model(inputs / "agree")
    assert step == 16
    mesh = make_mesh(data=-1)  # placed as Embedder.from_pretrained places a model on a mesh
    nnx.update(model, jax.device_put(nnx.state(model), state_shardings(nnx.state(model), mesh)))
    processor = MllamaInputProcessor.from_pretrained(str(inputs / "processor"), bos=config.data.bos,
                                                     max_length=config.data.max_length)
    embedder = Embedder(model, processor, batch_size=16, mesh=mesh)
    heldout = str(inputs / "demo" / "heldout")
    eval_set = set_from_records("heldout", itertools.islice(read_records(heldout), 48),
                                RecordSet(heldout).resolved_image_root(), hard_negatives=False)
    scored = evaluate_sets(lambda items: embedder.encode(items, progress=False), [eval_set], ks=(1,))
    assert scored["sets"]["heldout"]["n"] == logged[-1]["num_queries"] == 48
    assert scored["sets"]["heldout"]["recall@1"] == logged[-1]["recall@1"]
    assert logged[-1]["recall@1"] != logged[0]["recall@1"]  # the adapters changed what the run scored


def test_a_resume_that_cannot_hold_the_global_batch_stops_before_touching_the_run(inputs):
    """A mesh whose batch shards do not divide a GradCache chunk, or a global batch other than the checkpoint's,
    stops with an error naming both values, before the run directory changes."""
    import jax.numpy as jnp

    from mme5_jax.train import DataPosition, RunCheckpoints, TrainConfigError
    from mme5_jax.train.config import CheckpointSection
    from mme5_jax.train_step import TrainState

    output_dir = inputs / "refused"
    checkpoints = RunCheckpoints(output_dir / "checkpoints", CheckpointSection(async_save=False))
    state = TrainState(step=jnp.int32(2), trainable={"w": jnp.ones(2)}, opt_state={}, frozen={},
                       nonfinite_steps=jnp.int32(0))
    checkpoints.save(2, state, DataPosition(32, 16))
    checkpoints.finish()
    before = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*"))
    with pytest.raises(TrainConfigError, match=r"train.chunk_size: 4 must divide data.global_batch_size=16 and be a "
                                               r"multiple of the 8 batch shards of the mesh \(data x fsdp = 8 x 1\)"):
        train(load_config(write_config(inputs, "refused", {"train": {"chunk_size": 4}})))
    with pytest.raises(TrainConfigError, match="data.global_batch_size: 32, but the checkpoint at step 2 in .* "
                                               "trained with 16"):
        train(load_config(write_config(inputs, "refused", {"data": {"global_batch_size": 32}})))
    assert sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*")) == before
