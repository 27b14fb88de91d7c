"""Model configuration: HF config.json in both layouts, YAML configs, and the 11B shapes against HF itself."""
import json

import pytest
import torch
from flax import nnx
from transformers import MllamaConfig, MllamaForConditionalGeneration

from mme5_jax.config import ConfigError, ModelConfig
from mme5_jax.hf.layout import canonical_key
from mme5_jax.hf.weights import LM_HEAD_KEY, weight_map
from mme5_jax.model.mllama import abstract_model


def test_both_hf_layouts_parse_to_the_same_config():
    cfg = ModelConfig.from_yaml("llama-3.2-11b-vision")
    new, old = cfg.to_hf_dict("5"), cfg.to_hf_dict("4.46")
    assert "rope_parameters" in new["text_config"] and "rope_scaling" in old["text_config"]
    assert ModelConfig.from_hf_dict(new) == ModelConfig.from_hf_dict(old) == cfg
    hf = MllamaConfig(**json.loads(json.dumps(old)))  # transformers itself reads the 4.46 layout
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg


def test_save_and_read_config_json(tmp_path):
    cfg = ModelConfig.from_yaml("tiny")
    cfg.save_pretrained(tmp_path, layout="4.46")
    assert ModelConfig.from_pretrained(tmp_path) == cfg


def test_11b_parameter_shapes_and_count_match_hf():
    """Our weight table against HF's own 11B module tree (built on the meta device: no memory)."""
    cfg = ModelConfig.from_yaml("llama-3.2-11b-vision")
    with torch.device("meta"):
        hf = MllamaForConditionalGeneration(MllamaConfig(**cfg.to_hf_dict("5")))
    hf_shapes = {canonical_key(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    table = weight_map(cfg)
    assert set(hf_shapes) - {LM_HEAD_KEY} == set(table)
    assert all(hf_shapes[k] == t.hf_shape for k, t in table.items())
    state = nnx.state(abstract_model(cfg, "bfloat16"))
    ours = sum(v.size for _, v in nnx.to_flat_state(state))
    theirs = sum(v.numel() for k, v in hf.named_parameters() if not k.startswith("lm_head"))
    assert ours == theirs
    assert 10.6e9 < ours + hf_shapes[LM_HEAD_KEY][0] * hf_shapes[LM_HEAD_KEY][1] < 10.7e9


def test_bad_config_values_name_the_key(tmp_path):
    cfg = ModelConfig.from_yaml("tiny").to_hf_dict("5")
    cfg["text_config"]["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="text_config.num_key_value_heads"):
        ModelConfig.from_hf_dict(cfg)
    cfg = ModelConfig.from_yaml("tiny").to_hf_dict("5")
    cfg["vision_config"]["vision_output_dim"] = 100
    with pytest.raises(ConfigError, match="vision_config.vision_output_dim"):
        ModelConfig.from_hf_dict(cfg)
    cfg = ModelConfig.from_yaml("tiny").to_hf_dict("5")
    cfg["text_config"]["hidden_sise"] = 32
    with pytest.raises(ConfigError, match="hidden_sise"):
        ModelConfig.from_hf_dict(cfg)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_yaml("no-such-model")
