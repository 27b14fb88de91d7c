"""`mme5 train` config: YAML + dotted overrides, validated with errors that name the key."""
import shutil

import numpy as np
import pytest

from mme5_jax.configs import bundled_config
from mme5_jax.train import TrainConfigError, load_config, random_base_model

BASE = """
output_dir: runs/x
model: {config: tiny, processor_dir: proc}
data: {demo_dir: demo}
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    return str(path)


def test_defaults_and_overrides(config_file):
    config = load_config(config_file, ["train.steps=7", "checkpoint.every_steps=3", "seed=5", "train.lr=1",
                                       "train.eps=1e-6", "data.train=[a, {path: b, weight: 2}]",
                                       "adapter.targets=null"])
    assert (config.train.steps, config.checkpoint.every_steps, config.seed) == (7, 3, 5)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float) and config.train.eps == 1e-6
    assert [(e.path, e.weight) for e in config.data.train] == [("a", "auto"), ("b", 2.0)]
    assert config.output_dir == "runs/x" and config.adapter.kind == "dora"


def test_the_shipped_configs_load():
    for name in ("demo", "mme5_zero_shot", "mme5_supervised"):
        config = load_config(str(bundled_config(f"{name}.yaml")))
        assert (config.train.steps or 0) > 0 or config.train.epochs == 1


def test_bare_names_and_includes_resolve_to_bundled_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("demo", ["include=mesh/v5p-64.yaml"])
    assert config.output_dir == "runs/demo" and (config.mesh.data, config.mesh.fsdp) == (8, 4)
    (tmp_path / "demo.yaml").write_text(BASE)
    assert load_config("demo.yaml").output_dir == "runs/x"   # a file in the cwd comes first
    shutil.copy(bundled_config("mme5_supervised.yaml"), tmp_path / "mine.yaml")
    assert load_config("mine.yaml").adapter.alpha == 64     # its include: [mme5_zero_shot.yaml] is the bundled one
    with pytest.raises(TrainConfigError, match=r"include: .*mesh/zzz.yaml.*bundled in mesh/: 8xh100, v5p-256, v5p-64"):
        load_config("demo", ["include=mesh/zzz.yaml"])


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("train.steps.x=1", "train.steps has no sub-keys"),
    ("train.steps=abc", "train.steps: expected int, got 'abc'"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("train.steps=true", "train.steps: expected int"),
    ("train.lr=-1", "train.lr: must be >= 0"),
    ("model.dtype=fp16", "model.dtype: 'fp16' is not one of float32, bfloat16"),
    ("model.init=xavier", "model.init: 'xavier' is not one of hf, lecun"),
    ("data.train=[{path: a, wieght: 2}]", "unknown config key 'data.train[0].wieght'"),
    ("data.train=[3]", "data.train[0]: expected a mapping"),
    ("data.train=[{path: a, weight: most}]", "data.train[0].weight: must be > 0 or 'auto', got 'most'"),
    ("data.train=[a, {path: b, weight: -1}]", "data.train[1].weight: must be > 0 or 'auto', got -1.0"),
    ("train.epochs=0", "train.epochs: must be > 0"),
    ("distributed.process_id=2", None),
    ("no_equals_sign", "not of the form key=value"),
])
def test_bad_keys_and_values_are_named(config_file, override, message):
    if message is None:  # valid alone, but not with num_processes=2
        with pytest.raises(TrainConfigError, match="distributed.process_id"):
            load_config(config_file, [override, "distributed.num_processes=2"])
        return
    with pytest.raises(TrainConfigError) as err:
        load_config(config_file, [override])
    assert message in str(err.value)


def test_steps_or_epochs(config_file):
    with pytest.raises(TrainConfigError, match="set one of them, not both"):
        load_config(config_file, ["train.steps=3", "train.epochs=1"])
    config = load_config(config_file, ["train.epochs=0.5", "data.train=[a, {path: b, weight: 2}]"])
    assert config.train.epochs == 0.5 and config.train.steps is None
    assert [(e.path, e.weight) for e in config.data.train] == [("a", "auto"), ("b", 2.0)]


def test_bad_file_contents_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\nmodel: {config: tiny}\ndata: {demo_dir: d}\n")
    with pytest.raises(TrainConfigError, match="model.processor_dir"):
        load_config(str(path))
    path.write_text("model: {config: tiny, processor_dir: p}\ndata: {demo_dir: d}\n")
    with pytest.raises(TrainConfigError, match="missing required config key 'output_dir'"):
        load_config(str(path))
    with pytest.raises(TrainConfigError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"))


def test_heldout_recall_pools_identical_candidates_and_gives_ties_to_the_positive(tmp_path):
    """The trainer scores held-out records as `mme5 eval` does: identical candidates are one item, and only a
    candidate scoring strictly higher than the positive makes a miss."""
    from mme5_jax.records import ShardWriter
    from mme5_jax.train.heldout import heldout_set, score

    pairs = [("q0", "p0"), ("q1", "p1"), ("q2", "p1"), ("q3", "p3"), ("q4", "p4")]  # rows 1 and 2: same positive
    with ShardWriter(tmp_path / "heldout") as writer:
        for i, (query, positive) in enumerate(pairs):
            writer.write({"id": f"r{i}", "source": "test", "task": "retrieval", "modality": "T->T", "language": "en",
                          "qry_text": query, "qry_image": None, "pos_text": positive, "pos_image": None,
                          "neg_text": ["n"], "neg_image": [None]})
    eval_set = heldout_set(str(tmp_path / "heldout"), max_examples=4)
    # q2 points where no candidate does (a tie at 0 between all of them); q3 points at p0, not at its own p3.
    vectors = {"q0": 0, "p0": 0, "q1": 1, "p1": 1, "q2": 2, "q3": 0, "p3": 3}

    def encode(items):
        return np.eye(4, dtype=np.float32)[[vectors[item["text"]] for item in items]]

    assert score(encode, eval_set) == {"recall@1": 0.75, "num_queries": 4, "num_candidates": 3}


@pytest.mark.parametrize("init", ["hf", "lecun"])
def test_random_base_init(config_file, init):
    from flax import nnx

    _, model = random_base_model(load_config(config_file, [f"model.init={init}", "model.init_gate=0.5"]))
    params = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    patch, embed = params["vision_model.patch_embedding.kernel"], params["language_model.embed_tokens"]
    q_proj = params["language_model.blocks.layers.layers.0.self_attn.q_proj.kernel"]   # [layers, in, out]
    expected = {"hf": (0.02, 0.02, 0.02), "lecun": (1 / np.sqrt(patch.shape[0]), 1.0, 1 / np.sqrt(q_proj.shape[1]))}
    for value, std in zip((patch, embed, q_proj), expected[init]):
        assert value.std() == pytest.approx(std, rel=0.1)  # sampling: >= 2048 draws -> 1/sqrt(2n) <= 1.6%, so > 6 sigma
    assert np.all(params["language_model.blocks.layers.layers.1.cross_attn_attn_gate"] == 0.5)
    assert np.all(params["language_model.norm.weight"] == 1.0)   # norms keep HF's init either way


def test_train_entries_name_a_directory_or_a_tfds_dataset(config_file):
    from mme5_jax.data.tfds_source import TfdsRecordSet
    from mme5_jax.train import train_record_sets

    config = load_config(config_file, ['data.train=[a, {tfds: scenes, split: "train[:50%]", data_dir: d, weight: 2}]'])
    directory, dataset = train_record_sets(config)
    assert type(directory) is not TfdsRecordSet and directory.path == "a"
    assert isinstance(dataset, TfdsRecordSet)
    assert (dataset.path, dataset.split, dataset.data_dir, dataset.weight) == ("scenes", "train[:50%]", "d", 2.0)
    assert train_record_sets(load_config(config_file, ["data.train=[{tfds: scenes}]"]))[0].split == "train"
    for entry, words in [("{path: a, tfds: b}", "an entry needs exactly one of 'path'.*got path='a', tfds='b'"),
                         ("{weight: 2}", "an entry needs exactly one of 'path'"),
                         ("{path: a, split: test}", "'split' of the entry with path 'a' applies only to a 'tfds'")]:
        with pytest.raises(TrainConfigError, match=f"^data.train: {words}"):
            load_config(config_file, [f"data.train=[{entry}]"])
