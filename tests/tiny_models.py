"""The tiny random Hugging Face Mllama models the tests compare against: their configs, and directories holding them.

torch is imported only when a model is built: test_convert.py also runs as a worker beside JAX's gloo collectives,
which hang with torch loaded.
"""
import numpy as np

from assets import make_processor_dir
from mme5_jax.config import ModelConfig
from mme5_jax.hf.reader import load_hf_params
from mme5_jax.testing import REAL_TOKENIZER_CONFIG, TILE, tiny_hf_model

__all__ = ["REAL_TOKENIZER_CONFIG", "TILE", "HF_TEST_CONFIG", "EDGE_LAYERS_CONFIG", "GQA_LLAMA3_CONFIG",
           "tiny_hf_config", "tiny_hf_model", "save_tiny_hf_dir", "load_tiny_params"]

# HF's own test config (tests/models/mllama/test_modeling_mllama.py).
HF_TEST_CONFIG = dict(
    vision_config=dict(image_size=30, patch_size=2, num_channels=3, hidden_size=16, intermediate_layers_indices=[0],
                       vision_output_dim=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                       intermediate_size=37, max_num_tiles=4),
    text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=37, hidden_act="gelu", max_position_embeddings=512,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, cross_attention_layers=[1]),
    image_token_index=98,
)
# Intermediate layers [0, 2] and cross-attention at [0, 3].
EDGE_LAYERS_CONFIG = dict(
    vision_config=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_layers_indices=[0, 2],
                       vision_output_dim=96, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                       intermediate_size=64, max_num_tiles=4),
    text_config=dict(vocab_size=300, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=64, cross_attention_layers=[0, 3], pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    image_token_index=299,
)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# Grouped-query attention (8 heads, 2 KV heads) and llama3 RoPE scaling, in the 11B's 4-self + 1-cross pattern.
GQA_LLAMA3_CONFIG = dict(
    vision_config=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_layers_indices=[1, 3],
                       vision_output_dim=96, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                       intermediate_size=64, max_num_tiles=4),
    text_config=dict(vocab_size=300, hidden_size=64, num_hidden_layers=10, num_attention_heads=8,
                     num_key_value_heads=2, intermediate_size=96, cross_attention_layers=[3, 8], pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, rope_parameters=LLAMA3_ROPE),
    image_token_index=299,
)


def tiny_hf_config(base: dict = REAL_TOKENIZER_CONFIG, *, vision: dict | None = None, text: dict | None = None,
                   **top) -> dict:
    """A copy of `base` with some vision_config, text_config and top-level values replaced."""
    return {**base, "vision_config": {**base["vision_config"], **(vision or {})},
            "text_config": {**base["text_config"], **(text or {})}, **top}


def save_tiny_hf_dir(path: str, config: dict = REAL_TOKENIZER_CONFIG, seed: int = 0, processor: bool = False,
                     **save_kwargs):
    """Saves `tiny_hf_model(config, seed)` to `path`, with the offline Llama-3 processor files beside it when
    `processor` (configs with the real vocabulary); -> the torch model, the reference the tests compare with."""
    hf = tiny_hf_model(config, seed)
    hf.save_pretrained(path, **save_kwargs)
    if processor:
        vision = config["vision_config"]
        make_processor_dir(path, image_size=vision["image_size"], max_image_tiles=vision["max_num_tiles"])
    return hf


def load_tiny_params(path: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """(config, parameters) of a saved model, read by our own HF loader."""
    cfg = ModelConfig.from_pretrained(path)
    return cfg, load_hf_params(path, cfg, dtype, progress=False)
