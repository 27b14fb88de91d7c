"""The Grain pipeline: processor parity, static shapes, determinism, resume, mixing and bad input."""
import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from assets import make_processor_dir
from mme5_jax.data.demo import build_demo_dataset
from mme5_jax.data.mixture import RecordSet
from mme5_jax.data.images import IMAGE_KEYS
from mme5_jax.data.pipeline import (BadExampleError, PipelineConfig, image_layout, make_dataset, problem_report,
                                    to_global_batch)
from mme5_jax.processing import MllamaInputProcessor
from mme5_jax.records import encode_record, read_records

TILE = 28


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    return make_processor_dir(str(tmp_path_factory.mktemp("processor")), image_size=TILE, max_image_tiles=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=96, num_heldout=24, image_size=48,
                              photos=False)


def config(processor_dir, **overrides):
    return PipelineConfig(**{"processor_dir": processor_dir, "global_batch_size": 8, "length_buckets": (32, 64),
                             "max_length": 128, **overrides})


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        flat_x, flat_y = _flatten(x), _flatten(y)
        assert flat_x.keys() == flat_y.keys()
        for key in flat_x:
            np.testing.assert_array_equal(flat_x[key], flat_y[key], err_msg=key)


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def test_batches_equal_the_processor_and_have_static_shapes(processor_dir, demo):
    records = list(read_records(demo["train"]))
    processor = MllamaInputProcessor.from_pretrained(processor_dir, max_length=128)
    batches = list(make_dataset(config(processor_dir, num_negatives=3), [demo["train"]]))
    assert len(batches) == 96 // 8
    seen_text_only = seen_padded = False
    for batch in batches:
        length = batch["query"]["input_ids"].shape[1]
        assert length in (32, 64, 128)
        images = batch["images"]
        assert images["pixel_values"].shape[:2] == (1, 1) and images["pixel_values"].shape[3:] == (4, 3, TILE, TILE)
        real = sum(int((batch[g]["image_index"] >= 0).sum()) for g in ("query", "positive", "negatives"))
        assert images["row_id"].shape[2] == -(-real // 4) * 4  # one cell: the real images, to a multiple of 4
        assert batch["negatives"]["input_ids"].shape == (8, 3, length)
        assert batch["negatives"]["cross_attention_mask"].shape == (8, 3, length, 1, 4)
        for row, index in enumerate(batch["record_index"]):
            record = records[index]
            root = demo["train"]

            def item(text, image):
                return {"text": text, "image": None if image is None else os.path.join(root, image)}

            negatives = [item(t, i) for t, i in zip(record["neg_text"], record["neg_image"])]
            negatives += [negatives[-1]] * (3 - len(negatives))  # mmE5 pads by repeating the last one
            expected = {"query": processor([item(record["qry_text"], record["qry_image"])], pad_to=length),
                        "positive": processor([item(record["pos_text"], record["pos_image"])], pad_to=length),
                        "negatives": processor(negatives, pad_to=length)}
            for group, arrays in expected.items():
                for key, value in arrays.items():
                    if key in IMAGE_KEYS:
                        continue
                    got = batch[group][key][row]
                    np.testing.assert_array_equal(got, value if group == "negatives" else value[0],
                                                  err_msg=f"{record['id']} {group} {key}")
                for slot, index in enumerate(np.atleast_1d(batch[group]["image_index"][row])):
                    assert (index >= 0) == arrays["has_image"][slot], (record["id"], group, slot)
                    for key in IMAGE_KEYS if index >= 0 else ():
                        np.testing.assert_array_equal(images[key][0, 0, index], arrays[key][slot, 0],
                                                      err_msg=f"{record['id']} {group} {key}")
            seen_padded |= len(record["neg_text"]) < 3
        seen_text_only |= (~batch["query"]["has_image"]).any() and batch["query"]["has_image"].any()
    assert seen_text_only and seen_padded
    assert sorted(i for b in batches for i in b["record_index"]) == list(range(96))


def test_same_seed_same_batches_and_resume_with_workers(processor_dir, demo):
    cfg = config(processor_dir, num_epochs=2, seed=3)
    reference = list(make_dataset(cfg, [demo["train"]]))
    assert len(reference) == 2 * 96 // 8
    assert_batches_equal(reference, list(make_dataset(cfg, [demo["train"]])))
    other_seed = next(iter(make_dataset(config(processor_dir, seed=4), [demo["train"]])))
    assert not np.array_equal(other_seed["record_index"], reference[0]["record_index"])
    epochs = [sorted(i for b in reference[e * 12:(e + 1) * 12] for i in b["record_index"]) for e in range(2)]
    assert epochs[0] == epochs[1] == list(range(96))
    assert [b["record_index"].tolist() for b in reference[:12]] != [b["record_index"].tolist() for b in reference[12:]]

    # Stop after batch k, checkpoint the iterator state, restore it into a fresh pipeline: in process, and with
    # 2 worker processes (whose output order equals the in-process one).
    k = 5
    for workers in (0, 2):
        worker_cfg = PipelineConfig(**{**cfg.__dict__, "num_workers": workers})
        iterator = iter(make_dataset(worker_cfg, [demo["train"]]))
        assert_batches_equal(reference[:k], [next(iterator) for _ in range(k)])
        state = json.loads(json.dumps(iterator.get_state()))  # the state must survive a JSON checkpoint
        iterator.close()
        resumed = iter(make_dataset(worker_cfg, [demo["train"]]))
        resumed.set_state(state)
        try:
            assert_batches_equal(reference[k:], list(resumed))
        finally:
            resumed.close()


def test_mixture_follows_weights(processor_dir, demo):
    sets = [RecordSet(str(demo["train"]), weight=3.0), RecordSet(str(demo["heldout"]), weight=1.0)]
    batches = list(make_dataset(config(processor_dir, global_batch_size=8), sets))
    sources = np.concatenate([b["source_index"] for b in batches])
    assert len(sources) == 96  # the mixture ends when its first member (heldout, 24 records at weight 1) is used up
    assert (sources == 0).sum() == 72 and (sources == 1).sum() == 24


def _write_raw(path, entries):
    path.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path / "data-00000-of-00001.array_record"), "group_size:1")
    for entry in entries:
        writer.write(entry)
    writer.close()


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    root = base / "set"
    images = root / "img"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "ok.png")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(base / "outside.png")
    os.symlink(base / "outside.png", images / "link.png")  # the operator's link: followed
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(images / "cmyk.jpg")
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(images / "i16.png")  # 16-bit grey
    palette = Image.new("P", (40, 30), 3)
    palette.info["transparency"] = 3
    palette.save(images / "palette.png", transparency=3)
    Image.new("RGBA", (40, 30), (0, 0, 255, 100)).save(images / "alpha.png")
    Image.new("L", (300, 300), 128).save(images / "bomb.png")
    (images / "zero.png").write_bytes(b"")
    (images / "garbage.jpg").write_bytes(os.urandom(500))
    Image.new("RGB", (120, 90), (1, 2, 3)).save(images / "big.jpg", quality=95)
    (images / "truncated.jpg").write_bytes((images / "big.jpg").read_bytes()[:300])

    def record(i, qry_image, qry_text="Represent the given image."):
        return {"id": f"b{i}", "source": "bad", "task": "retrieval", "modality": "IT->T", "language": "en",
                "qry_text": qry_text, "qry_image": qry_image, "pos_text": "a red box", "pos_image": None,
                "neg_text": ["a blue box"], "neg_image": [None]}

    entries = [encode_record(record(i, f"img/{name}")) for i, name in enumerate(
        ["ok.png", "cmyk.jpg", "i16.png", "palette.png", "alpha.png", "ok.png", "link.png",  # handled: kept
         "zero.png", "garbage.jpg", "truncated.jpg", "missing.png", "bomb.png"])]  # skipped
    entries += [
        encode_record(record(20, "../outside.png")),
        encode_record(record(21, "img/ok.png", qry_text="")),
        encode_record(record(22, "img/ok.png", qry_text="x" * 5000)),
        b"{not json",
        encode_record({"id": "b24"}),
        encode_record({**record(25, "img/ok.png"), "neg_text": ["a", "b"],
                       "modality": "IT->I", "pos_image": "img/ok.png", "neg_image": ["img/zero.png", "img/ok.png"]}),
        encode_record(record(26, "img/ok.png", qry_text="many words " * 300)),  # > max_length tokens: truncated
    ]
    _write_raw(root, entries)
    return root


BAD_CONFIG = {"global_batch_size": 1, "max_text_chars": 4000, "max_image_pixels": 50_000, "length_buckets": (32,)}


def test_bad_input_is_counted_by_reason_and_masked(processor_dir, bad_set):
    """A rejected entry keeps its place in the stream as a masked placeholder row, so every entry is one row."""
    iterator = iter(make_dataset(config(processor_dir, **BAD_CONFIG), [bad_set]))
    batches = [batch for batch in iterator]
    report = problem_report(iterator)
    assert len(batches) == 19
    kept = [b for b in batches if b["example_mask"][0]]
    for placeholder in (b for b in batches if not b["example_mask"][0]):
        assert placeholder["record_index"][0] == placeholder["source_index"][0] == -1
        assert not placeholder["negative_mask"].any() and not placeholder["query"]["has_image"].any()
        assert placeholder["query"]["attention_mask"].sum() >= 1  # a real (empty) text the model can encode
    assert sorted(int(b["record_index"][0]) for b in kept) == [0, 1, 2, 3, 4, 5, 6, 17, 18]
    assert report["rejected"] == {"corrupt_image": 3, "decompression_bomb": 1, "empty_text": 1, "invalid_record": 1,
                                  "malformed_json": 1, "missing_image": 1, "path_escapes_root": 1,
                                  "text_too_long": 1}
    assert report["notes"] == {"negative_dropped_corrupt_image": 1, "truncated_text": 1}
    truncated = next(b for b in kept if b["record_index"][0] == 18)
    assert truncated["query"]["attention_mask"].sum() == 128 and truncated["query"]["input_ids"][0, 1] == 128256
    # the record whose first negative image is 0 bytes keeps its good negative, repeated to fill k
    last = next(b for b in kept if b["record_index"][0] == 17)
    assert last["negatives"]["has_image"].all() and last["negative_mask"].all()
    first, third = last["negatives"]["image_index"][0, [0, 2]]
    assert first != third  # two slots, two packed copies of the same image
    pixels = last["images"]["pixel_values"][0, 0]
    np.testing.assert_array_equal(pixels[first], pixels[third])


def test_raise_policy_names_the_record(processor_dir, bad_set):
    with pytest.raises(BadExampleError) as err:
        list(make_dataset(config(processor_dir, bad_input="raise", **BAD_CONFIG), [bad_set]))
    # the first bad entry in shuffled order is #15, which is not JSON and so has no id to name
    assert str(err.value).startswith("source 0 record #15: malformed_json: record #15: entry is not UTF-8 JSON")


def test_global_batch_on_a_mesh(processor_dir, demo):
    import jax

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    layout = image_layout(mesh, 8)
    host = next(iter(make_dataset(config(processor_dir), [demo["train"]], layout=layout)))
    pad = MllamaInputProcessor.from_pretrained(processor_dir).pad_token_id
    with pytest.raises(ValueError, match="packed for another mesh"):
        to_global_batch(next(iter(make_dataset(config(processor_dir), [demo["train"]]))), mesh, pad)
    batch = to_global_batch(host, mesh, pad)
    assert batch["negatives"]["input_ids"].shape == host["negatives"]["input_ids"].shape
    assert batch["images"]["pixel_values"].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
    assert batch["query"]["image_index"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    # Each device holds its rows' images: a row's image_index points into its own shard of `images`.
    per_device = batch["images"]["row_id"].shape[1] // 8
    row_ids = np.asarray(batch["images"]["row_id"])
    checked = 0
    for r in range(8):
        for group in ("query", "negatives"):
            for slot, index in enumerate(np.atleast_1d(host[group]["image_index"][r])):
                if index >= 0:
                    slot_id = 0 if group == "query" else 2 + slot
                    assert row_ids[0, r * per_device + index] == host["row_index"][r] * 5 + slot_id
                    checked += 1
    assert checked
    assert len(batch["query"]["input_ids"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch["positive"]["input_ids"]), host["positive"]["input_ids"])


def test_iterator_state_in_an_orbax_checkpoint(processor_dir, demo, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = config(processor_dir, seed=11)
    reference = list(make_dataset(cfg, [demo["train"]]))
    iterator = iter(make_dataset(cfg, [demo["train"]]))
    for _ in range(3):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    restored = iter(make_dataset(cfg, [demo["train"]]))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_batches_equal(reference[3:], list(restored))


def test_every_process_count_reads_the_same_global_batches(processor_dir, demo):
    """Global batch s is the same entries in the same row order for 1, 2 or 4 processes, and a pipeline started at
    `position` continues the stream exactly: what makes resuming onto another topology lossless."""
    cfg = config(processor_dir, seed=5)
    reference = [b["record_index"].tolist() for b in make_dataset(cfg, [demo["train"]])]
    assert len(reference) == 12
    for count, position in ((2, 0), (4, 0), (2, 3 * 8), (4, 5 * 8)):
        shares = [[b["record_index"].tolist() for b in make_dataset(cfg, [demo["train"]], i, count, position)]
                  for i in range(count)]
        steps = [sum(parts, []) for parts in zip(*shares)]
        assert steps == reference[position // 8:], (count, position)
