"""The shipped supervised recipe makes one pass: every record of every set once, none replayed."""
import logging

import pytest

from mme5_jax.configs import bundled_config
from mme5_jax.data.mixture import open_mixture
from mme5_jax.records import ShardWriter
from mme5_jax.train import load_config, plan_steps, train_record_sets

CONFIGS = bundled_config()
# Rows per set at 1/1000 of the real sizes: 560K synthetic rows and MMEB-train's subsets capped at 50K (about half
# of them are smaller). The four extra sets' sizes are rounded estimates; only the proportions matter here.
SIZES = {
    "mme5-synthetic": 560, "ImageNet_1K": 50, "N24News": 49, "HatefulMemes": 8, "VOC2007": 8, "SUN397": 20,
    "OK-VQA": 9, "A-OKVQA": 17, "DocVQA": 40, "InfographicsVQA": 24, "ChartQA": 28, "Visual7W": 50, "VisDial": 50,
    "CIRR": 26, "VisualNews_t2i": 50, "VisualNews_i2t": 50, "MSCOCO_t2i": 50, "MSCOCO_i2t": 50, "NIGHTS": 16,
    "WebQA": 17, "MSCOCO": 50, "TAT-DQA": 13, "ArxivQA": 50, "InfoSeek_it2t": 50, "InfoSeek_it2it": 50,
}
BATCH = 16


def _write_set(path, name, size):
    with ShardWriter(path, records_per_shard=64) as writer:
        for i in range(size):
            writer.write({"id": f"{name}-{i}", "source": name, "task": "retrieval", "modality": "T->T",
                          "language": "en", "qry_text": f"query {i}\n", "qry_image": None, "pos_text": f"answer {i}\n",
                          "pos_image": None, "neg_text": [], "neg_image": []})


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipe")
    for name, size in SIZES.items():
        _write_set(base / "data" / ("mme5-synthetic" if name == "mme5-synthetic" else f"mmeb-train/{name}"), name, size)
    return base


def _drawn(config, count):
    dataset = open_mixture(train_record_sets(config), config.seed).dataset.repeat(None)
    return [dataset[i][:2] for i in range(count)]


def test_supervised_recipe_reads_each_row_once(recipe_data, monkeypatch, caplog):
    monkeypatch.chdir(recipe_data)
    config = load_config(str(CONFIGS / "mme5_supervised.yaml"), [f"data.global_batch_size={BATCH}"])
    assert len(config.data.train) == len(SIZES) and {e.weight for e in config.data.train} == {"auto"}
    with caplog.at_level(logging.WARNING, logger="mme5_jax"):
        config = plan_steps(config)
    total = sum(SIZES.values())
    assert config.train.steps == total // BATCH and not caplog.records
    drawn = _drawn(config, config.train.steps * BATCH)
    assert len(set(drawn)) == len(drawn) and total - len(drawn) < BATCH  # only the last partial batch is left
    sizes = list(SIZES.values())
    for source, size in enumerate(sizes):  # every set is read through, not truncated
        assert sum(1 for s, _ in drawn if s == source) >= size - BATCH


def test_fixed_weights_that_replay_a_set_are_warned_about(recipe_data, monkeypatch, caplog):
    """The recipe as first shipped: 50,000 for every labelled set, whatever its real size."""
    monkeypatch.chdir(recipe_data)
    weights = [560 if name == "mme5-synthetic" else 50 for name in SIZES]
    entries = ", ".join(f"{{path: {e.path}, weight: {w}}}" for e, w in zip(
        load_config(str(CONFIGS / "mme5_supervised.yaml")).data.train, weights))
    config = load_config(str(CONFIGS / "mme5_supervised.yaml"),
                         [f"data.global_batch_size={BATCH}", f"data.train=[{entries}]", "train.epochs=null",
                          f"train.steps={1760 // BATCH}"])
    with caplog.at_level(logging.WARNING, logger="mme5_jax"):
        plan_steps(config)
    (warning,) = caplog.records
    assert "13 of 25 record sets repeat within train.steps=110 x data.global_batch_size=16 = 1760 examples" in \
        warning.getMessage()
    assert "data/mmeb-train/HatefulMemes: 8 records, about 50 draws (6.2x)" in warning.getMessage()
    drawn = _drawn(config, 1760)
    assert len(set(drawn)) < len(drawn)
