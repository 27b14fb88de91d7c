"""GradCache bounds activation memory by the chunk: compiled temporaries barely grow from global batch 32 to 512,
while plain backprop grows with the batch. Lowered and compiled from abstract shapes only; nothing runs."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mme5_jax import train_step as ts
from mme5_jax.config import ModelConfig
from mme5_jax.model import lora
from mme5_jax.model.mllama import MllamaModel
from mme5_jax.sharding import make_mesh

TEXT_ONLY = {"vision": {"hidden_size": 16, "num_hidden_layers": 1, "num_global_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 16, "vision_output_dim": 32, "image_size": 28, "patch_size": 14,
                        "max_num_tiles": 1, "intermediate_layers_indices": [0]},
             "text": {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "intermediate_size": 128, "cross_attention_layers": [1]},
             "image_token_index": 256}
LENGTH, K, CHUNK = 64, 1, 32


def abstract_batch(b):
    def text(*lead):
        return {"input_ids": jax.ShapeDtypeStruct((*lead, LENGTH), jnp.int32),
                              "attention_mask": jax.ShapeDtypeStruct((*lead, LENGTH), jnp.int32)}
    return {"query": text(b), "positive": text(b), "negatives": text(b, K),
            "negative_mask": jax.ShapeDtypeStruct((b, K), jnp.bool_)}


@pytest.fixture(scope="module")
def temp_bytes():
    cfg = ModelConfig.from_dict(TEXT_ONLY)

    def build():
        model = MllamaModel(cfg, rngs=nnx.Rngs(0))
        lora.add_adapters(model, lora.AdapterConfig(), nnx.Rngs(1))
        return model

    graphdef, trainable, frozen = nnx.split(nnx.eval_shape(build), lora.LoRAParam, ...)
    optimizer = ts.make_optimizer(ts.make_schedule("mme5", 1e-5, 100))
    zero = jnp.zeros((), jnp.int32)
    state = jax.eval_shape(lambda t, f: ts.TrainState(zero, t, optimizer.init(t), f, zero), trainable, frozen)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def measure(chunk_size, b):
        step = ts.TrainStep(graphdef, optimizer, mesh, chunk_size=chunk_size)
        compiled = step.lower(state, abstract_batch(b), rng).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    sizes = {(chunk, b): measure(chunk, b) for chunk in (CHUNK, None) for b in (32, 512)}
    print("compiled temp bytes (chunk, global batch):", sizes)
    return sizes


def test_gradcache_memory_is_flat_in_batch(temp_bytes):
    assert temp_bytes[(CHUNK, 512)] <= 1.2 * temp_bytes[(CHUNK, 32)], temp_bytes


def test_plain_backprop_memory_grows_with_batch(temp_bytes):
    assert temp_bytes[(None, 512)] >= 5 * temp_bytes[(None, 32)], temp_bytes
