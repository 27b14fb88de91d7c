"""Typed Mllama model configuration that reads and writes Hugging Face `config.json` in both layouts.

Hugging Face changed the text-config RoPE keys between transformers 4.46 (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`), and released mmE5 checkpoints use the old one. Parsing both into one frozen dataclass keeps
every other module free of version checks.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field

import yaml
from flax.core import FrozenDict

from mme5_jax.configs import BundledConfigNotFound, config_path

ACTIVATION_NAMES = ("gelu", "silu", "gelu_pytorch_tanh")
DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


class ConfigError(ValueError):
    """A model configuration key is missing, unknown or has an invalid value."""


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    num_attention_heads: int = 16
    intermediate_size: int = 5120
    vision_output_dim: int = 7680
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple = DEFAULT_ASPECT_RATIOS
    hidden_act: str = "gelu"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per tile including CLS (1025 for 448-px tiles)."""
        return self.patches_per_side**2 + 1

    @property
    def padded_num_patches(self) -> int:
        return -(-self.num_patches // 8) * 8

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self):
        _require(self.hidden_size % self.num_attention_heads == 0, "vision_config.hidden_size",
                 f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        expected = self.hidden_size * (len(self.intermediate_layers_indices) + 1)
        _require(self.vision_output_dim == expected, "vision_config.vision_output_dim",
                 f"{self.vision_output_dim} != hidden_size * (len(intermediate_layers_indices) + 1) = {expected}")
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_hidden_layers]
        _require(not bad, "vision_config.intermediate_layers_indices",
                 f"{bad} outside [0, {self.num_hidden_layers})")
        _require(list(self.intermediate_layers_indices) == sorted(set(self.intermediate_layers_indices)),
                 "vision_config.intermediate_layers_indices", "must be strictly increasing")
        _require(self.hidden_act in ACTIVATION_NAMES, "vision_config.hidden_act",
                 f"{self.hidden_act!r} is not supported")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: FrozenDict | None = FrozenDict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)
    max_position_embeddings: int = 131072
    cross_attention_layers: tuple = (3, 8, 13, 18, 23, 28, 33, 38)
    bos_token_id: int = 128000
    eos_token_id: int | tuple = 128001
    pad_token_id: int = 128004
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_kinds(self) -> tuple:
        """'cross' or 'self' per decoder layer, in order."""
        cross = set(self.cross_attention_layers)
        return tuple("cross" if i in cross else "self" for i in range(self.num_hidden_layers))

    def validate(self):
        _require(self.hidden_size % self.num_attention_heads == 0, "text_config.hidden_size",
                 f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "text_config.num_key_value_heads",
                 f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}")
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_hidden_layers]
        _require(not bad, "text_config.cross_attention_layers", f"{bad} outside [0, {self.num_hidden_layers})")
        _require(self.hidden_act in ACTIVATION_NAMES, "text_config.hidden_act", f"{self.hidden_act!r} is not supported")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        _require(rope_type in ("default", "llama3"), "text_config.rope_scaling.rope_type",
                 f"{rope_type!r} is not supported (default, llama3)")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 128256

    def validate(self) -> "ModelConfig":
        self.vision.validate()
        self.text.validate()
        return self

    # --- Hugging Face config.json -------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        vision = dict(d.get("vision_config") or {})
        text = dict(d.get("text_config") or {})
        if "attention_heads" in vision:
            vision["num_attention_heads"] = vision.pop("attention_heads")
        rope = text.pop("rope_parameters", None)
        if rope is not None:  # transformers 5.x layout
            rope = dict(rope)
            text["rope_theta"] = rope.pop("rope_theta", TextConfig.rope_theta)
            text["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        elif "rope_scaling" in text and text["rope_scaling"] is not None:  # 4.46 layout
            scaling = dict(text["rope_scaling"])
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            text["rope_scaling"] = scaling if scaling["rope_type"] != "default" else None
        elif "rope_theta" in text:
            text["rope_scaling"] = None
        image_token = d.get("image_token_index", d.get("image_token_id", cls.image_token_index))
        return cls(vision=_build(VisionConfig, vision, "vision_config"),
                   text=_build(TextConfig, text, "text_config"),
                   image_token_index=image_token).validate()

    def to_hf_dict(self, layout: str = "installed") -> dict:
        """A `config.json` dict in the given key layout: "4.46", "5", or "installed" (the running transformers)."""
        from mme5_jax.hf.layout import config_layout

        layout = config_layout(layout)
        v = dataclasses.asdict(self.vision)
        vision = dict(
            hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_global_layers=v["num_global_layers"], attention_heads=v["num_attention_heads"],
            intermediate_size=v["intermediate_size"], vision_output_dim=v["vision_output_dim"],
            image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v["num_channels"],
            norm_eps=v["norm_eps"], max_num_tiles=v["max_num_tiles"],
            intermediate_layers_indices=list(v["intermediate_layers_indices"]),
            supported_aspect_ratios=[list(r) for r in v["supported_aspect_ratios"]],
            hidden_act=v["hidden_act"], model_type="mllama_vision_model")
        t = dataclasses.asdict(self.text)
        text = {k: t[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                                  "max_position_embeddings", "bos_token_id", "pad_token_id", "hidden_act",
                                  "tie_word_embeddings")}
        text["eos_token_id"] = list(t["eos_token_id"]) if isinstance(t["eos_token_id"], tuple) else t["eos_token_id"]
        text["cross_attention_layers"] = list(t["cross_attention_layers"])
        text["model_type"] = "mllama_text_model"
        if layout == "5":
            text["rope_parameters"] = {"rope_type": "default", **dict(t["rope_scaling"] or {}),
                                       "rope_theta": t["rope_theta"]}
        elif layout == "4.46":
            text["rope_theta"] = t["rope_theta"]
            text["rope_scaling"] = dict(t["rope_scaling"]) if t["rope_scaling"] else None
        else:
            raise ConfigError(f"unknown config layout {layout!r}; use '4.46', '5' or 'installed'")
        return dict(architectures=["MllamaForConditionalGeneration"], model_type="mllama",
                    image_token_index=self.image_token_index, vision_config=vision, text_config=text)

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        """Reads `config.json` from a Hugging Face directory or one of our checkpoint directories."""
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in {path!r}")
        with open(config_file, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))

    def save_pretrained(self, path: str, layout: str = "installed"):
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(layout), f, indent=2)

    # --- YAML model configs (mme5_jax/configs/model/*.yaml) ------------------------------------------------------
    @classmethod
    def from_yaml(cls, path_or_name: str) -> "ModelConfig":
        """Loads a YAML path, or a bundled `model/NAME.yaml` by name, in our field names (`vision:`, `text:`)."""
        try:
            path = config_path(path_or_name, "model")
        except BundledConfigNotFound as err:
            raise ConfigError(str(err)) from None
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        return cls.from_dict(d, where=str(path))

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> "ModelConfig":
        unknown = set(d) - {"vision", "text", "image_token_index"}
        _require(not unknown, f"{where}: {sorted(unknown)}", "unknown keys (expected vision, text, image_token_index)")
        return cls(vision=_build(VisionConfig, d.get("vision") or {}, f"{where}: vision"),
                   text=_build(TextConfig, d.get("text") or {}, f"{where}: text"),
                   image_token_index=d.get("image_token_index", cls.image_token_index)).validate()


_HF_ONLY_KEYS = {"model_type", "initializer_range", "use_cache", "dropout", "transformers_version", "architectures",
                 "output_hidden_states", "return_dict", "dtype", "torch_dtype", "chunk_size_feed_forward",
                 "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path", "output_attentions",
                 "attention_bias", "pretraining_tp", "mlp_bias", "head_dim", "attention_dropout", "rope_type"}


def _build(cls, d: dict, where: str):
    """Builds a frozen config from a dict, ignoring HF bookkeeping keys and naming any unknown key."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and k not in _HF_ONLY_KEYS)
    _require(not unknown, f"{where}: {unknown}", "unknown config keys")
    kwargs = {}
    for k, v in d.items():
        if k not in names or v is None and k != "rope_scaling":
            continue
        if isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        elif isinstance(v, dict):
            v = FrozenDict(v)  # configs are hashable: jit caches and NNX graph definitions key on them
        kwargs[k] = v
    return cls(**kwargs)


def _require(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"{key}: {message}")
