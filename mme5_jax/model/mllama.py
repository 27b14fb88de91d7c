"""Mllama as an embedding model: vision tower -> projector -> text decoder -> last-token pooling (mmE5)."""
import jax
import jax.numpy as jnp
from flax import nnx

from mme5_jax.config import ModelConfig
from mme5_jax.model import DTYPES, tower_remat
from mme5_jax.model.layers import Linear
from mme5_jax.model.text import TextModel
from mme5_jax.model.vision import VisionModel


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
        return getattr(jnp, dtype)
    return dtype


class MllamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype="float32", param_dtype=None, rngs: nnx.Rngs,
                 remat: str = "none"):
        dtype = resolve_dtype(dtype)
        param_dtype = resolve_dtype(param_dtype) if param_dtype is not None else dtype
        self.cfg = cfg
        self.dtype = dtype
        vision_remat, text_remat = tower_remat(remat)
        self.vision_model = VisionModel(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                        remat=vision_remat)
        self.multi_modal_projector = Linear(cfg.vision.vision_output_dim, cfg.text.hidden_size,
                                            ("vision_out", "embed"), bias=True, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)
        self.language_model = TextModel(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=text_remat)

    def vision_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        """Projected vision tokens [N, T*patches, D] of N images (pixel_values [N,T,C,H,W])."""
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        n, t, p, _ = features.shape
        return self.multi_modal_projector(features).reshape(n, t * p, -1)

    def __call__(self, batch: dict, collect: bool = False, cross_states=None):
        """Final-norm hidden states for a processed batch (keys as `MllamaInputProcessor` returns).

        The images are one per row (`pixel_values` [B,1,T,C,H,W]), or already encoded: `cross_states` [B, T*patches,
        D] from `vision_states`, as the train step passes them. A batch with neither runs text-only, skipping the
        vision tower and the cross-attention layers.
        """
        if cross_states is None and batch.get("pixel_values") is not None:
            pixel_values = batch["pixel_values"]
            if pixel_values.shape[1] != 1:
                raise ValueError(f"exactly one image per sample is supported, got pixel_values {pixel_values.shape}")
            cross_states = self.vision_states(pixel_values[:, 0], batch["aspect_ratio_ids"][:, 0],
                                              batch["aspect_ratio_mask"][:, 0])
        return self.language_model(batch["input_ids"], batch["attention_mask"], cross_states,
                                   batch.get("cross_attention_mask"), batch.get("has_image"), collect=collect)

    def embed(self, batch: dict, cross_states=None):
        """mmE5 embedding: the final-norm state at the last non-pad token, L2-normalised in float32."""
        return pool_last_token(self(batch, cross_states=cross_states), batch["attention_mask"])


def pool_last_token(hidden, attention_mask):
    last = jnp.sum(attention_mask.astype(jnp.int32), axis=1) - 1
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def abstract_model(cfg: ModelConfig, dtype="float32", remat: str = "none") -> MllamaModel:
    """The model with shapes only (no memory), to be filled from a checkpoint."""
    return nnx.eval_shape(lambda: MllamaModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), remat=remat))


def model_from_params(cfg: ModelConfig, params: dict, dtype="float32", remat: str = "none") -> MllamaModel:
    """Builds the model from {param path: array}; every parameter must be given exactly once."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype, remat))
    flat = dict(nnx.to_flat_state(state))
    missing = sorted(set(flat) - set(params))
    unknown = sorted(set(params) - set(flat))
    if missing or unknown:
        raise ValueError(f"parameter tree mismatch: missing {missing[:5]}, unknown {unknown[:5]}")
    for path, variable in flat.items():
        value = params[path]
        value = value if isinstance(value, jax.Array) else jnp.asarray(value)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"parameter {'/'.join(map(str, path))}: shape {tuple(value.shape)}, "
                             f"expected {tuple(variable.shape)}")
        variable.set_value(value) if hasattr(variable, "set_value") else setattr(variable, "value", value)
    return nnx.merge(graphdef, state)
