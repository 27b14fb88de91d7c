"""`mme5 convert jax-to-hf RUN_DIR OUT --merge-lora | --peft` for LoRA and DoRA runs: HF embeddings equal ours."""
import numpy as np
import pytest
import yaml

from hf_reference import hf_embed_items
from train_fixtures import make_inputs, write_config

from mme5_jax.cli import main as mme5
from mme5_jax.testing import multilingual_texts, real_photos

pytestmark = pytest.mark.numerics  # CI runs these twice more beside a CPU-bound process



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("export"))


def make_run(root, kind):
    """A run directory as `mme5 train` leaves it, with adapters set to non-trivial values (no training needed)."""
    import jax
    from flax import nnx

    from mme5_jax.model.lora import LoRAParam
    from mme5_jax.sharding import make_mesh
    from mme5_jax.train import DataPosition, RunCheckpoints, build_model, load_config, save_random_base
    from mme5_jax.train_step import init_train_state, make_optimizer, make_schedule

    config = load_config(write_config(root, kind, {"adapter": {"kind": kind, "dropout": 0.0}}))
    out = root / kind
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    cfg, model = build_model(config, save_random_base(config, out))
    key = jax.random.key(7)
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        value = variable.get_value()
        variable.set_value(value + 0.3 * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype))
    optimizer = make_optimizer(make_schedule("constant", 1e-3, 10))
    _, state = init_train_state(model, optimizer, make_mesh(8))
    checkpoints = RunCheckpoints(out / "checkpoints", config.checkpoint)
    checkpoints.save(3, state, DataPosition(0, config.data.global_batch_size))
    checkpoints.finish()
    return str(out), model


def items():
    photos = [image for _, image in real_photos()[:3]]
    texts = multilingual_texts()[:4]
    return ([{"text": "Represent the given image.\n", "image": photo} for photo in photos]
            + [{"text": text, "image": None} for text in texts])


def ours(model, processor_dir):
    from mme5_jax.embedder import Embedder
    from mme5_jax.processing import MllamaInputProcessor

    return Embedder(model, MllamaInputProcessor.from_pretrained(processor_dir), batch_size=8).encode(items())


def cosines(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("kind", ["dora", "lora"])
def test_merged_and_peft_exports_embed_like_ours(inputs, kind):
    import torch
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    run_dir, model = make_run(inputs, kind)
    expected = ours(model, str(inputs / "processor"))

    merged_dir = str(inputs / f"{kind}-merged")
    assert mme5(["convert", "jax-to-hf", run_dir, merged_dir, "--merge-lora"]) == 0
    merged = MllamaForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    # 1 - cos = |hf - ours|^2 / 2 <= 2e-9 at fp32 parity (1e-5 x sqrt(32)); float32 cosines round <= 32 x 6e-8 = 2e-6.
    assert cosines(hf_embed_items(merged, processor, items()), expected).min() >= 0.99999

    base_dir, peft_dir = str(inputs / f"{kind}-base-hf"), str(inputs / f"{kind}-peft")
    assert mme5(["convert", "jax-to-hf", f"{run_dir}/base", base_dir]) == 0
    assert mme5(["convert", "jax-to-hf", run_dir, peft_dir, "--peft"]) == 0
    assert PeftConfig.from_pretrained(peft_dir).use_dora == (kind == "dora")
    fresh = get_peft_model(MllamaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32),
                           PeftConfig.from_pretrained(peft_dir))
    result = set_peft_model_state_dict(fresh, load_file(f"{peft_dir}/adapter_model.safetensors"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    base = MllamaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, peft_dir).eval()
    deltas = [p for name, p in adapted.named_parameters() if "lora_B" in name]
    assert deltas and all(float(p.abs().sum()) > 0 for p in deltas)
    assert cosines(hf_embed_items(adapted, processor, items()), expected).min() >= 0.99999  # as for the merged export
