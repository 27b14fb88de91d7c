"""Converters: HF -> our Orbax checkpoint -> HF bit-exact in both key layouts and dtypes, identical embeddings,
sharded restore onto 8-device meshes, bounded host memory, and bad input that names the tensor and leaves nothing."""
import dataclasses
import filecmp
import json
import os
import tracemalloc

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mme5_jax import base_checkpoint
from mme5_jax.config import ModelConfig
from mme5_jax.convert import hf_to_jax, jax_to_hf
from mme5_jax.hf.layout import canonical_key, installed_key
from mme5_jax.hf.reader import HFCheckpoint, load_hf_params
from mme5_jax.hf.weights import WeightError

# torch and the HF reference helpers are imported inside the tests: this file also runs as the worker of the
# two-process test, and torch loaded beside JAX's gloo collectives makes them hang.


def hf_tensors(path) -> dict:
    ckpt = HFCheckpoint(path)
    return {key: ckpt.get(key) for key in ckpt.keys()}


def assert_bit_exact(expected: dict, actual: dict):
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
        assert np.array_equal(actual[key].view(np.uint8), value.view(np.uint8)), key


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    """Tiny model with the real tokenizer: HF dir, our checkpoint, and HF again (forced into several shards)."""
    from tiny_models import save_tiny_hf_dir

    root = tmp_path_factory.mktemp("convert")
    hf_dir, ours, back = str(root / "hf"), str(root / "ours"), str(root / "back")
    hf = save_tiny_hf_dir(hf_dir, processor=True)
    hf_to_jax(hf_dir, ours, progress=False)
    jax_to_hf(ours, back, max_shard_bytes=4 << 20, progress=False)
    return hf_dir, ours, back, hf


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory):
    from tiny_models import HF_TEST_CONFIG, save_tiny_hf_dir

    path = str(tmp_path_factory.mktemp("small_hf"))
    save_tiny_hf_dir(path, HF_TEST_CONFIG)
    return path


def test_fp32_round_trip_is_bit_exact_with_shards_and_index(real_dirs):
    hf_dir, ours, back, _ = real_dirs
    assert_bit_exact(hf_tensors(hf_dir), hf_tensors(back))
    assert ModelConfig.from_pretrained(back) == ModelConfig.from_pretrained(hf_dir)
    assert ModelConfig.from_pretrained(ours) == ModelConfig.from_pretrained(hf_dir)
    index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    sizes = {s: os.path.getsize(os.path.join(back, s)) for s in shards}
    assert index["metadata"]["total_size"] <= sum(sizes.values())
    for shard, size in sizes.items():  # a tensor above the limit (the embedding, lm_head) gets a shard of its own
        keys = [k for k, v in index["weight_map"].items() if v == shard]
        assert size <= (4 << 20) + 8192 or len(keys) == 1, (shard, size, keys)
    # the on-disk key names transformers' own save_pretrained writes
    assert set(index["weight_map"]) == set(load_file(os.path.join(hf_dir, "model.safetensors")))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "generation_config.json"):
        assert filecmp.cmp(os.path.join(hf_dir, name), os.path.join(ours, name), shallow=False), name
        assert filecmp.cmp(os.path.join(hf_dir, name), os.path.join(back, name), shallow=False), name
    meta = base_checkpoint.read_metadata(ours)
    assert meta["dtype"] == "float32"
    assert meta["extras"]["lm_head.weight"]["shape"] == [128256, 32]


def test_checkpoint_loads_from_a_relative_path(real_dirs, monkeypatch):
    _, ours, _, _ = real_dirs
    cfg = ModelConfig.from_pretrained(ours)
    expected = base_checkpoint.load_base_params(ours, cfg, "float32")
    monkeypatch.chdir(os.path.dirname(ours))
    relative = base_checkpoint.load_base_params(os.path.basename(ours), cfg, "float32")
    assert sorted(relative) == sorted(expected)
    assert all(np.array_equal(relative[k], expected[k]) for k in expected)


@pytest.mark.parametrize("layout", ["4.46", "5"])
def test_bf16_round_trip_in_both_key_layouts_is_bit_exact(small_hf_dir, tmp_path, layout):
    """bf16 sources with transformers-4.46 keys (released mmE5) or 5.x keys, through our format and back."""
    import torch
    from safetensors.torch import save_file as save_torch

    cfg = ModelConfig.from_pretrained(small_hf_dir)
    src = tmp_path / "src"
    os.makedirs(src)
    tensors = load_file(os.path.join(small_hf_dir, "model.safetensors"))
    bf16 = {installed_key(canonical_key(k), layout): torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    up = {"4.46": "language_model.model.layers.0.mlp.up_proj.weight",
          "5": "model.language_model.layers.0.mlp.up_proj.weight"}[layout]
    assert up in bf16
    save_torch(bf16, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(src), layout=layout)
    hf_to_jax(str(src), str(tmp_path / "ours"), progress=False)
    meta = base_checkpoint.read_metadata(str(tmp_path / "ours"))
    assert meta["dtype"] == "bfloat16" and meta["source"]["key_layout"] == layout
    jax_to_hf(str(tmp_path / "ours"), str(tmp_path / "same_layout"), layout=layout, progress=False)
    jax_to_hf(str(tmp_path / "ours"), str(tmp_path / "installed"), progress=False)
    assert_bit_exact(hf_tensors(str(src)), hf_tensors(str(tmp_path / "installed")))
    written = json.load(open(tmp_path / "same_layout" / "model.safetensors.index.json"))["weight_map"]
    assert set(written) == set(bf16)
    for out in ("same_layout", "installed"):
        assert ModelConfig.from_pretrained(str(tmp_path / out)) == cfg
    config = json.load(open(tmp_path / "same_layout" / "config.json"))
    assert config["dtype" if layout == "5" else "torch_dtype"] == "bfloat16"


def test_embeddings_identical_through_both_converters(real_dirs):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from hf_reference import hf_embed_items
    from mme5_jax import Embedder
    from mme5_jax.testing import real_photos

    hf_dir, ours, back, hf = real_dirs
    items = [{"text": "Represent the given image.\n", "image": real_photos()[0][1]}]  # every weight takes part
    reference = Embedder.from_pretrained(hf_dir, batch_size=2)
    converted = Embedder.from_pretrained(ours, batch_size=2)
    assert np.array_equal(reference.encode(items), converted.encode(items))

    reloaded, info = MllamaForConditionalGeneration.from_pretrained(back, attn_implementation="eager",
                                                                    output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(back)  # the copied processor files are byte-identical
    assert np.array_equal(hf_embed_items(hf, processor, items), hf_embed_items(reloaded.eval(), processor, items))


@pytest.fixture(scope="module")
def hf_params(real_dirs):
    hf_dir = real_dirs[0]
    return load_hf_params(hf_dir, ModelConfig.from_pretrained(hf_dir), np.float32, progress=False)


@pytest.mark.parametrize("fsdp,tensor", [(8, 1), (2, 4), (1, 8)])
def test_sharded_restore_follows_logical_axes(real_dirs, hf_params, fsdp, tensor):
    from flax import nnx

    from mme5_jax.model.mllama import abstract_model
    from mme5_jax.sharding import load_rules, logical_to_spec, make_mesh

    ours = real_dirs[1]
    cfg = ModelConfig.from_pretrained(ours)
    mesh = make_mesh(data=1, fsdp=fsdp, tensor=tensor)
    restored = base_checkpoint.load_base_params(ours, cfg, "float32", mesh=mesh)
    reference = hf_params
    variables = dict(nnx.to_flat_state(nnx.state(abstract_model(cfg))))
    rules = {**load_rules(), None: None}
    used_axes = set()
    assert restored.keys() == reference.keys() == variables.keys()
    for path, array in restored.items():
        spec = logical_to_spec(variables[path].get_metadata("logical_axes"), array.shape, mesh, rules)
        assert array.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), array.ndim), path
        used_axes.update(a for a in spec if a)
        assert np.array_equal(np.asarray(array), reference[path]), path
    assert used_axes == {a for a, n in (("fsdp", fsdp), ("tensor", tensor)) if n > 1}
    gate = restored[("language_model", "blocks", "layers", "layers", 0, "mlp", "gate_proj", "kernel")]
    assert gate.addressable_shards[0].data.shape == (gate.shape[0], gate.shape[1] // fsdp, gate.shape[2] // tensor)


def test_host_memory_stays_below_half_the_checkpoint(tmp_path):
    """Streaming: the traced peak is bounded by one stacked parameter plus the flush buffer, not by the model."""
    from tiny_models import HF_TEST_CONFIG, save_tiny_hf_dir, tiny_hf_config

    config = tiny_hf_config(HF_TEST_CONFIG, text=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=20,
                                                      cross_attention_layers=[4, 9, 14, 19]))
    save_tiny_hf_dir(str(tmp_path / "hf"), config, max_shard_size="1MB")
    size = sum(os.path.getsize(tmp_path / "hf" / n) for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors"))
    tracemalloc.start()
    try:
        hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "ours"), progress=False, flush_bytes=size // 8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"hf-to-jax traced peak {peak / 1e6:.2f} MB for a {size / 1e6:.2f} MB checkpoint")
    assert size > 4e6 and peak < 0.5 * size
    jax_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), progress=False)
    assert_bit_exact(hf_tensors(str(tmp_path / "hf")), hf_tensors(str(tmp_path / "back")))


# --- bad input ----------------------------------------------------------------------------------------------------
def _sharded_copy(src, dst, edit=None, config_edit=None):
    """`src` rewritten as two shards + index in the 5.x key layout, with optional edits of the tensor dict (by
    canonical key) and of config.json."""
    os.makedirs(dst)
    tensors = {canonical_key(k): v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    if edit:
        edit(tensors)
    tensors = {installed_key(k, "5"): v for k, v in tensors.items()}
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, os.path.join(dst, name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}
    json.dump(index, open(os.path.join(dst, "model.safetensors.index.json"), "w"))
    config = json.load(open(os.path.join(src, "config.json")))
    if config_edit:
        config_edit(config)
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return halves


UP = "language_model.layers.0.mlp.up_proj.weight"


def _truncate(dst, halves):
    name = next(iter(halves))
    with open(os.path.join(dst, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(dst, name)) - 100)


BAD_INPUTS = {
    "missing shard": (None, None, lambda dst, halves: os.remove(os.path.join(dst, next(iter(halves)))),
                      r"missing shard.*model-00001-of-00002"),
    "truncated file": (None, None, _truncate, r"model-00001-of-00002.safetensors: truncated"),
    "unexpected dtype": (lambda t: t.update({UP: t[UP].astype(np.int32)}), None, None,
                         r"language_model\.layers\.0\.mlp\.up_proj\.weight.*dtype I32"),
    "shape mismatch": (None, lambda c: c["text_config"].update(intermediate_size=40), None,
                       r"mlp\.(up|gate)_proj\.weight.*\(37, 32\).*\(40, 32\)"),
    "unknown key": (lambda t: t.update({"language_model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
                    None, None, r"unexpected tensors: language_model\.layers\.0\.mlp\.extra\.weight"),
    "missing key": (lambda t: t.pop(UP), None, None, r"missing tensors: language_model\.layers\.0\.mlp\.up_proj"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_tensor_and_leaves_no_output(small_hf_dir, tmp_path, case):
    edit, config_edit, damage, message = BAD_INPUTS[case]
    src = str(tmp_path / "src")
    halves = _sharded_copy(small_hf_dir, src, edit, config_edit)
    if damage:
        damage(src, halves)
    out_parent = tmp_path / "out"
    os.makedirs(out_parent)
    with pytest.raises(WeightError, match=message):
        hf_to_jax(src, str(out_parent / "ckpt"), progress=False)
    assert os.listdir(out_parent) == []


def test_interrupted_conversion_leaves_nothing(small_hf_dir, tmp_path, monkeypatch):
    from mme5_jax import convert

    calls = []

    def failing_read(reader, items, dtype):
        calls.append(items[0][0])
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real_read(reader, items, dtype)

    real_read = convert.read_param
    monkeypatch.setattr(convert, "read_param", failing_read)
    os.makedirs(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        hf_to_jax(small_hf_dir, str(tmp_path / "out" / "ckpt"), progress=False, flush_bytes=1)
    assert len(calls) == 20 and os.listdir(tmp_path / "out") == []
    monkeypatch.undo()
    hf_to_jax(small_hf_dir, str(tmp_path / "out" / "ckpt"), progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        hf_to_jax(small_hf_dir, str(tmp_path / "out" / "ckpt"), progress=False)
    with pytest.raises(WeightError, match="parameters.*language_model.norm.weight|does not match"):
        cfg = ModelConfig.from_pretrained(small_hf_dir)
        bad = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_size=64))
        base_checkpoint.load_base_params(str(tmp_path / "out" / "ckpt"), bad, "float32")


def test_cli_convert_and_inspect_both_formats(small_hf_dir, tmp_path, capsys):
    from mme5_jax.cli import main

    ours, back = str(tmp_path / "ours"), str(tmp_path / "back")
    assert main(["convert", "hf-to-jax", small_hf_dir, ours, "--dtype", "bfloat16"]) == 0
    assert main(["convert", "jax-to-hf", ours, back, "--max-shard-size", "20KB"]) == 0
    assert len(json.load(open(os.path.join(back, "model.safetensors.index.json")))["weight_map"]) == 78
    original = hf_tensors(small_hf_dir)
    converted = hf_tensors(back)
    assert all(converted[k].dtype.name == "bfloat16" for k in converted)
    assert all(np.array_equal(converted[k], original[k].astype(converted[k].dtype)) for k in original)
    capsys.readouterr()
    assert main(["convert", "inspect", ours]) == 0
    text = capsys.readouterr().out
    assert "mme5 checkpoint (bfloat16" in text
    assert "down_proj.kernel  [1, 37, 32]  bfloat16" in text and "lm_head.weight  [99, 32]  bfloat16" in text
    assert main(["convert", "inspect", back]) == 0
    text = capsys.readouterr().out
    assert "Hugging Face safetensors" in text and "78 tensors" in text
    assert "down_proj.weight  [32, 37]  bfloat16" in text


# --- two processes (gloo on one machine stands in for a pod) ----------------------------------------------------
def _process_main(rank, port, hf_dir, out_dir, result_path):
    """One of two processes: convert together, then restore onto a (fsdp 2, tensor 4) mesh spanning both."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
    from mme5_jax.sharding import make_mesh

    hf_to_jax(hf_dir, out_dir, progress=False, flush_bytes=20000)
    cfg = ModelConfig.from_pretrained(out_dir)
    reference = load_hf_params(hf_dir, cfg, np.float32, progress=False)
    restored = base_checkpoint.load_base_params(out_dir, cfg, "float32", mesh=make_mesh(data=1, fsdp=2, tensor=4))
    wrong = [base_checkpoint.param_key(path) for path, array in restored.items()
             if not all(np.array_equal(np.asarray(s.data), reference[path][s.index]) for s in array.addressable_shards)]
    with open(result_path, "w") as f:
        json.dump({"process_index": jax.process_index(), "devices": jax.device_count(), "params": len(restored),
                   "wrong": wrong}, f)
    jax.distributed.shutdown()


def test_two_processes_write_their_own_shards_and_restore_onto_a_shared_mesh(small_hf_dir, tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.path.dirname(__file__),
                                          os.environ.get("PYTHONPATH", "")])}
    ours = str(tmp_path / "ours")
    results = [tmp_path / f"process{rank}.json" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), small_hf_dir, ours, str(results[rank])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:  # a hang: stop both and show what they printed
            for other in procs:
                other.kill()
            logs.append(proc.communicate()[0])
    text = "\n".join(log.decode(errors="replace")[-3000:] for log in logs)
    assert all(p.returncode == 0 for p in procs), text
    outputs = [json.loads(path.read_text()) for path in results]
    assert [o["process_index"] for o in outputs] == [0, 1] and {o["devices"] for o in outputs} == {8}
    assert all(o["params"] > 50 and o["wrong"] == [] for o in outputs), outputs
    writers = {name[len("ocdbt.process_")] for name in os.listdir(os.path.join(ours, base_checkpoint.WEIGHTS_DIR,
                                                                               base_checkpoint.PYTREE_DIR))
               if name.startswith("ocdbt.process_")}
    assert writers == {"0", "1"}  # each process wrote the shards it owns
    assert sorted(os.listdir(tmp_path)) == ["ours", "process0.json", "process1.json"]
    jax_to_hf(ours, str(tmp_path / "back"), progress=False)
    assert_bit_exact(hf_tensors(small_hf_dir), hf_tensors(str(tmp_path / "back")))


if __name__ == "__main__":
    import sys

    _process_main(int(sys.argv[1]), sys.argv[2], *sys.argv[3:6])
