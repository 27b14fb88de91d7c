"""Analytic FLOPs of one mmE5 training step, for MFU and HFU.

The usual 6N-per-token rule assumes every weight gets a gradient. Here the base weights are frozen, so a matmul
costs its forward (2 m k n) plus, only where gradients must flow *through* its input, the activation gradient
(another 2 m k n); there is never a weight gradient for it. The walk below follows the model module by module
(vision tower, projector, text self- and cross-attention layers, the InfoNCE logits) and tracks which activations
depend on trainable adapters, exactly as autodiff + dead-code elimination do: a frozen vision tower in front of
text-only adapters costs its forward and nothing else.

Two totals come out:
- **model FLOPs** (MFU numerator): the work the recipe needs. Causal self-attention counts only the (query, key)
  pairs the mask keeps (about half).
- **hardware FLOPs** (HFU numerator): what our implementation executes. Attention computes the full masked
  matrix; GradCache runs an extra forward of every encoder call; remat
  recomputes the forward of scanned layers that backpropagate ("full": every matmul; "dots_no_batch": attention
  einsums; "dots": none; approximate, as XLA may skip recomputing outputs the backward does not read).

Norms, softmax, RoPE, activations and the optimiser update are elementwise and left out (XLA counts them, which
is the main systematic difference against `cost_analysis()`, see docs/benchmarks.md).
"""
import contextlib
import functools
import re
from dataclasses import dataclass, field

import jax

from mme5_jax.config import ModelConfig
from mme5_jax.model import REMAT_CHOICES, tower_remat
from mme5_jax.model.vision import local_segments

REMAT_RECOMPUTE = {"none": (), "full": ("dense", "attention", "lora", "dora"),
                   "full_keep_attention": ("dense", "lora", "dora"), "dots": (),
                   "dots_no_batch": ("attention",)}


@dataclass(frozen=True)
class Encode:
    """One forward of the model over `batch` sequences of `seq_len` tokens. `tiles` > 0: the rows see images of
    `tiles` tiles, `images` of them real (default: one per row). The vision tower encodes the real images only, as
    the train step does; the cross-attention layers run over every row, and count as model work for the rows with
    an image."""

    batch: int
    seq_len: int
    tiles: int = 0
    images: int | None = None

    @property
    def real_images(self) -> int:
        return self.batch if self.images is None else self.images


@dataclass
class Op:
    part: str          # vision | projector | text_self | text_cross | loss
    kind: str          # dense | attention | lora | dora
    fwd: float
    bwd: float
    kept: float = 1.0  # fraction of the executed work that is model work (causal masking)
    recompute: bool = False  # inside a scanned layer that backpropagates (remat recomputes it)


@dataclass
class StepFlops:
    model: float
    hardware: float
    forward_executed: float
    breakdown: dict = field(default_factory=dict)

    def to_dict(self):
        return {"model": self.model, "hardware": self.hardware, "forward_executed": self.forward_executed,
                "breakdown": self.breakdown}


class _Walk:
    """Accumulates the ops of forward calls, tracking whether each activation depends on an adapter."""

    def __init__(self, cfg: ModelConfig, adapter=None, dropout_active: bool = True):
        self.cfg = cfg
        self.adapter = adapter
        self.patterns = [re.compile(p) for p in adapter.targets] if adapter is not None else []
        self.dora_drop = adapter is not None and adapter.kind == "dora" and adapter.dropout > 0 and dropout_active
        self.ops: list[Op] = []
        self.linear_paths: set[str] = set()

    def adapted(self, path):
        return any(p.fullmatch(path) for p in self.patterns)

    def dense(self, part, path, m, k, n, grad_in):
        """x[m,k] @ W[k,n] with W frozen (plus its adapter if targeted) -> whether the output carries gradient."""
        self.linear_paths.add(path)
        base = 2.0 * m * k * n
        self.ops.append(Op(part, "dense", base, base if grad_in else 0.0))
        if not self.adapted(path):
            return grad_in
        r = self.adapter.rank
        # x A, (x A) B; backward: dB, dY B^T, dA, and dX through A only when the input needs it.
        lora_bwd = 2.0 * m * r * (2 * n + k) + (2.0 * m * r * k if grad_in else 0.0)
        self.ops.append(Op(part, "lora", 2.0 * m * r * (k + n), lora_bwd))
        if self.adapter.kind == "dora":
            # The weight norm needs s A B (per call, whatever m); with dropout PEFT multiplies W by x' again.
            extra = base if self.dora_drop else 0.0
            self.ops.append(Op(part, "dora", 2.0 * k * r * n + extra, extra if grad_in else 0.0))
        return True

    def attention(self, part, b, heads, q_len, k_len, head_dim, gq, gk, gv, causal):
        """Scores and probs @ V; backward dQ, dK (scores) and dP, dV (values) where needed."""
        one = 2.0 * b * heads * q_len * k_len * head_dim
        needs_dp = gq or gk
        bwd = one * (gq + gk) + one * (needs_dp + gv)
        kept = (q_len * (q_len + 1) / 2) / (q_len * k_len) if causal else 1.0
        self.ops.append(Op(part, "attention", 2 * one, bwd, kept))
        return gq or gk or gv

    def scanned_layer(self, run, *args):
        """Runs one layer of a scanned stack; marks its ops for remat when gradient flows out of it."""
        start = len(self.ops)
        grad_out = run(*args)
        if grad_out:
            for op in self.ops[start:]:
                op.recompute = True
        return grad_out

    # --- vision tower and projector ---------------------------------------------------------------------------
    def vision(self, b, tiles):
        v = self.cfg.vision
        d, tokens = v.hidden_size, tiles * v.padded_num_patches
        g = self.dense("vision", "vision_model.patch_embedding", b * tiles * (v.num_patches - 1),
                       v.num_channels * v.patch_size**2, d, False)
        prefixes = [f"vision_model.local_segments.{s}.layers"
                    for s, (start, stop) in enumerate(local_segments(v)) for _ in range(start, stop)]
        prefixes += ["vision_model.global_layers.layers"] * v.num_global_layers
        for prefix in prefixes:
            g = self.scanned_layer(self._vision_layer, prefix, b, tokens, g)
        return self.dense("projector", "multi_modal_projector", b * tiles * v.num_patches, v.vision_output_dim,
                          self.cfg.text.hidden_size, g)

    def _vision_layer(self, prefix, b, tokens, g):
        v = self.cfg.vision
        d, m = v.hidden_size, b * tokens
        q, k, val = [self.dense("vision", f"{prefix}.self_attn.{n}_proj", m, d, d, g) for n in "qkv"]
        attn = self.attention("vision", b, v.num_attention_heads, tokens, tokens, v.head_dim, q, k, val, False)
        g = self.dense("vision", f"{prefix}.self_attn.o_proj", m, d, d, attn) or g
        hidden = self.dense("vision", f"{prefix}.mlp.fc1", m, d, v.intermediate_size, g)
        return self.dense("vision", f"{prefix}.mlp.fc2", m, v.intermediate_size, d, hidden) or g

    # --- text decoder -----------------------------------------------------------------------------------------
    def text(self, b, seq_len, vision_tokens, g_vision):
        t = self.cfg.text
        kinds = t.layer_kinds
        period = next(p for p in range(1, len(kinds) + 1)
                      if len(kinds) % p == 0 and all(kinds[i] == kinds[i % p] for i in range(len(kinds))))
        g = False
        for i, kind in enumerate(kinds):
            prefix = f"language_model.blocks.layers.layers.{i % period}"
            if kind == "self":
                g = self.scanned_layer(self._self_layer, prefix, b, seq_len, g)
            else:
                self.linear_paths.update(f"{prefix}.{n}" for n in _CROSS_LINEARS)
                if vision_tokens:  # text-only calls skip cross-attention layers entirely
                    g = self.scanned_layer(self._cross_layer, prefix, b, seq_len, vision_tokens, g, g_vision)
        return g

    def _self_layer(self, prefix, b, n, g):
        t = self.cfg.text
        d, hd, m = t.hidden_size, t.head_dim, b * n
        q = self.dense("text_self", f"{prefix}.self_attn.q_proj", m, d, t.num_attention_heads * hd, g)
        k = self.dense("text_self", f"{prefix}.self_attn.k_proj", m, d, t.num_key_value_heads * hd, g)
        v = self.dense("text_self", f"{prefix}.self_attn.v_proj", m, d, t.num_key_value_heads * hd, g)
        attn = self.attention("text_self", b, t.num_attention_heads, n, n, hd, q, k, v, True)
        g = self.dense("text_self", f"{prefix}.self_attn.o_proj", m, t.num_attention_heads * hd, d, attn) or g
        return self._mlp("text_self", prefix, m, g) or g

    def _cross_layer(self, prefix, b, n, vision_tokens, g, g_vision):
        t = self.cfg.text
        d, hd, m, mv = t.hidden_size, t.head_dim, b * n, b * vision_tokens
        q = self.dense("text_cross", f"{prefix}.cross_attn.q_proj", m, d, t.num_attention_heads * hd, g)
        k = self.dense("text_cross", f"{prefix}.cross_attn.k_proj", mv, d, t.num_key_value_heads * hd, g_vision)
        v = self.dense("text_cross", f"{prefix}.cross_attn.v_proj", mv, d, t.num_key_value_heads * hd, g_vision)
        attn = self.attention("text_cross", b, t.num_attention_heads, n, vision_tokens, hd, q, k, v, False)
        g = self.dense("text_cross", f"{prefix}.cross_attn.o_proj", m, t.num_attention_heads * hd, d, attn) or g
        return self._mlp("text_cross", prefix, m, g) or g

    def _mlp(self, part, prefix, m, g):
        t = self.cfg.text
        gate = self.dense(part, f"{prefix}.mlp.gate_proj", m, t.hidden_size, t.intermediate_size, g)
        up = self.dense(part, f"{prefix}.mlp.up_proj", m, t.hidden_size, t.intermediate_size, g)
        return self.dense(part, f"{prefix}.mlp.down_proj", m, t.intermediate_size, t.hidden_size, gate or up)

    def encode(self, call: Encode):
        """The ops of one embedding forward -> whether the embeddings carry gradient."""
        g_vision, vision_tokens = False, 0
        if call.tiles:
            if call.real_images:
                g_vision = self.vision(call.real_images, call.tiles)
            vision_tokens = call.tiles * self.cfg.vision.num_patches
        start = len(self.ops)
        grad = self.text(call.batch, call.seq_len, vision_tokens, g_vision)
        for op in self.ops[start:]:
            if op.part == "text_cross":  # rows without an image keep their input (HF): executed, not model work
                op.kept *= call.real_images / call.batch
        return grad


_CROSS_LINEARS = ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _sum(ops, key):
    return float(sum(key(op) for op in ops))


def forward_flops(cfg: ModelConfig, call: Encode, adapter=None, dropout_active: bool = False) -> float:
    """Executed FLOPs of one forward (inference or GradCache's first pass): full masked attention included."""
    walk = _Walk(cfg, adapter, dropout_active)
    walk.encode(call)
    return _sum(walk.ops, lambda op: op.fwd)


def step_flops(cfg: ModelConfig, calls, adapter, *, num_queries: int, num_negatives: int = 0,
               grad_cache: bool = False, remat: str = "none", dropout_active: bool = True) -> StepFlops:
    """FLOPs of one training step: the encoder `calls` (e.g. queries with images, positives text-only at their own
    lengths, as padded batches when the data is), InfoNCE over `num_queries` x (num_queries + k) logits, and the
    backward pass."""
    if remat not in REMAT_CHOICES:
        raise ValueError(f"remat policy {remat!r} unknown; choose from {sorted(REMAT_CHOICES)}")
    if adapter is None:
        raise ValueError("a training step needs an adapter config: without adapters nothing is trained")
    logits = 2.0 * num_queries * (num_queries + num_negatives) * cfg.text.hidden_size
    loss = Op("loss", "dense", logits, 2 * logits)

    walk = _Walk(cfg, adapter, dropout_active)
    for call in calls:
        walk.encode(call)
    ops = walk.ops + [loss]
    model = _sum(ops, lambda op: (op.fwd + op.bwd) * op.kept)
    forward_executed = _sum(walk.ops, lambda op: op.fwd)
    vision, text = (REMAT_RECOMPUTE[policy] for policy in tower_remat(remat))

    def recomputed(op):
        return op.recompute and op.kind in (vision if op.part in ("vision", "projector") else text)

    remat_extra = _sum(walk.ops, lambda op: op.fwd if recomputed(op) else 0.0)
    grad_cache_extra = forward_executed if grad_cache else 0.0
    single_pass = _sum(ops, lambda op: op.fwd + op.bwd)
    hardware = single_pass + remat_extra + grad_cache_extra

    breakdown = {}
    for op in ops:
        entry = breakdown.setdefault(f"{op.part}/{op.kind}", {"fwd": 0.0, "bwd": 0.0})
        entry["fwd"] += op.fwd * op.kept
        entry["bwd"] += op.bwd * op.kept
    breakdown["hardware_only/grad_cache_forward"] = grad_cache_extra
    breakdown["hardware_only/remat_recompute"] = remat_extra
    breakdown["hardware_only/masked_attention"] = single_pass - model
    return StepFlops(model=model, hardware=hardware, forward_executed=forward_executed, breakdown=breakdown)


def linear_paths(cfg: ModelConfig) -> set:
    """Dotted paths of every `Linear` the walk accounts for (a test checks them against the model's own)."""
    walk = _Walk(cfg)
    walk.encode(Encode(batch=1, seq_len=1, tiles=1))
    return walk.linear_paths


@contextlib.contextmanager
def _unrolled_scans():
    """XLA's cost analysis counts a while-loop body once, whatever its trip count; fully unrolled `lax.scan` and
    `lax.map` make it count every layer and chunk. Only for measuring: the program computes the same values."""
    scan, lax_map = jax.lax.scan, jax.lax.map
    jax.lax.scan = functools.partial(scan, unroll=True)
    jax.lax.map = lambda f, xs: scan(lambda carry, x: (carry, f(x)), (), xs, unroll=True)[1]
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.map = scan, lax_map


def xla_flops(lower) -> float:
    """XLA `cost_analysis()` FLOPs of the computation `lower()` returns (a `jax.stages.Lowered`), traced with
    every scan unrolled. `lower` must trace afresh (a new jit wrapper), not hit a cached trace.

    CSE is off: once unrolled, GradCache's two passes over a chunk become one straight-line program and XLA
    would merge their identical (adapter-free) parts, which the real, looped step cannot do."""
    with _unrolled_scans():
        compiled = lower().compile(compiler_options={"xla_disable_hlo_passes": "cse"})
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
