"""The LoRA/DoRA adapter settings (`mme5_jax.model.lora` applies them), without JAX, so that the `adapter:` section
of a training or bench config is this dataclass and validates before JAX starts."""
import re
from dataclasses import dataclass

# mmE5's adapted modules: attention projections of the vision tower and the decoder, and the decoder's down_proj.
MME5_TARGETS = (
    r"vision_model\.(local_segments\.\d+|global_layers)\.layers\.self_attn\.[qkvo]_proj",
    r"language_model\.blocks\.layers\.layers\.\d+\.(self_attn|cross_attn)\.[qkvo]_proj",
    r"language_model\.blocks\.layers\.layers\.\d+\.mlp\.down_proj",
)
KINDS = ("lora", "dora")


@dataclass(frozen=True)
class AdapterConfig:
    """`targets` are regular expressions that must match a whole dotted module path of our model; None (null in
    YAML) stands for MME5_TARGETS. The defaults are mmE5's recipe."""

    kind: str = "dora"
    rank: int = 8
    alpha: float = 64.0
    dropout: float = 0.1
    targets: tuple[str, ...] | None = MME5_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", MME5_TARGETS if self.targets is None else tuple(self.targets))
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} unknown; choose from {KINDS}")
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("adapter targets are empty")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"adapter target {pattern!r} is not a valid regex: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
