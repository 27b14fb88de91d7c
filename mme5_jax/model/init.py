"""Randomly initialised models, for demos (`mme5 train` without `model.path`) and benchmarks."""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mme5_jax.config import ModelConfig
from mme5_jax.model import INITS
from mme5_jax.model.mllama import MllamaModel

GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate")


def random_model(cfg: ModelConfig, *, dtype="float32", remat: str = "none", seed: int = 0, init: str = "hf",
                 gate: float = 1.0) -> MllamaModel:
    """The model as HF initialises it, drawn on the default device (no host copy: an 11B benchmark model costs
    its own size), with the cross-attention gates at `gate`: HF's init closes them (tanh(0) = 0), which would
    leave a frozen random model blind to images (gates are not adapted).

    `init="lecun"` redraws every kernel at std 1/sqrt(fan_in) and the token embeddings at std 1. HF's std 0.02
    suits 4096-wide layers; in a 32- to 128-wide demo model each projection then shrinks its input 3-9x, so almost
    nothing of the image or the earlier tokens reaches the pooled last token (same text with different images:
    embedding cosine 0.9999), and adapters on that frozen base barely learn.
    """
    if init not in INITS:
        raise ValueError(f"init {init!r} unknown; choose from {INITS}")
    model = MllamaModel(cfg, dtype=dtype, rngs=nnx.Rngs(seed), remat=remat)
    key = jax.random.key(seed)
    for index, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model))):
        if path[-1] in GATES:
            variable.set_value(jnp.full(variable.shape, gate, variable.dtype))
        elif init == "lecun" and path[-1] in ("kernel", "embed_tokens"):
            std = 1.0 if path[-1] == "embed_tokens" else 1.0 / math.sqrt(variable.shape[-2])
            noise = jax.random.normal(jax.random.fold_in(key, index), variable.shape, jnp.float32)
            variable.set_value((std * noise).astype(variable.dtype))
    return model
