"""`mme5 train` config: YAML + dotted overrides, validated with errors that name the key."""
import numpy as np
import pytest

from mme5_jax.train import TrainConfigError, load_config, random_base_model, recall_at_1

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
        config = load_config(f"configs/{name}.yaml")
        assert (config.train.steps or 0) > 0 or config.train.epochs == 1


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


def test_recall_counts_identical_candidates_once():
    q = np.eye(3, dtype=np.float32)
    p = np.eye(3, dtype=np.float32)[[0, 1, 1]]   # rows 1 and 2 have the same positive
    keys = np.array([10, 20, 20])
    result = recall_at_1(q, p, keys)
    assert result["num_candidates"] == 2
    assert result["recall@1"] == pytest.approx(2 / 3)   # query 2 (a direction no candidate has) misses


@pytest.mark.parametrize("init", ["hf", "lecun"])
def test_random_base_init(config_file, init):
    from flax import nnx

    _, model = random_base_model(load_config(config_file, [f"model.init={init}", "model.init_gate=0.5"]))
    params = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    patch, embed = params["vision_model.patch_embedding.kernel"], params["language_model.embed_tokens"]
    q_proj = params["language_model.blocks.layers.layers.0.self_attn.q_proj.kernel"]   # [layers, in, out]
    expected = {"hf": (0.02, 0.02, 0.02), "lecun": (1 / np.sqrt(patch.shape[0]), 1.0, 1 / np.sqrt(q_proj.shape[1]))}
    for value, std in zip((patch, embed, q_proj), expected[init]):
        assert value.std() == pytest.approx(std, rel=0.1)
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
