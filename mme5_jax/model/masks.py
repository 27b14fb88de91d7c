"""Attention masks in their compact form, expanded one block of queries at a time, so no [B, Q, K] bias is ever
read from memory. `allowed(positions)` -> bool [B, 1, len(positions), K]; positions past the end (a padded last
block) give rows that are discarded. Masked pairs get HF's finfo.min bias, so fully masked rows behave as there.

`layers.attention` (blocked) and `splash.splash_attention` (TPU kernels) both take them.
"""
import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CausalMask:
    """Decoder self-attention: query q sees keys k <= q that are not padding. key_valid [B, K]."""

    key_valid: jax.Array

    def allowed(self, positions):
        causal = jnp.arange(self.key_valid.shape[1])[None, :] <= positions[:, None]
        return (causal[None] & self.key_valid[:, None, :])[:, None]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PaddingPairMask:
    """HF's vision-tower rule: a (query, key) pair is masked only when both are padding. invalid [B, S]."""

    invalid: jax.Array

    def allowed(self, positions):
        invalid_q = jnp.take(self.invalid, positions, axis=1, mode="clip")
        return ~(invalid_q[:, :, None] & self.invalid[:, None, :])[:, None]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TileMask:
    """Cross-attention to image tiles: row l sees the `tokens_per_tile` vision tokens of each tile it may see.
    A row that may see no tile sees every vision token, unmasked (HF zeroes such rows' mask; the caller masks only
    their MLP output). tiles [B, L, T]."""

    tiles: jax.Array
    tokens_per_tile: int = dataclasses.field(metadata=dict(static=True))

    def allowed(self, positions):
        tiles = jnp.take(self.tiles, positions, axis=1, mode="clip")
        allowed = jnp.repeat(tiles, self.tokens_per_tile, axis=-1)
        return (allowed | ~tiles.any(-1, keepdims=True))[:, None]
