"""A tiny random Hugging Face Mllama and offline sample inputs, shared by the tests and the benchmarks in tools/.

Here rather than under tests/ so that the tools run from the installed package alone. The heavy dependencies
(torch, scikit-image, scikit-learn: the `test` extra) are imported on first use, so importing this module costs
nothing and does not load torch (which hangs beside JAX's gloo collectives in the multi-process tests).
"""
import functools
import os

import numpy as np
from PIL import Image

TILE = 28
# The real Llama-3 vocabulary (`<|image|>` at 128256), so the offline tokenizer of `mme5_jax.llama3_processor`
# fits; 28-px tiles of 2x2 patches, GQA and llama3 RoPE scaling, cross-attention at [1, 3].
REAL_TOKENIZER_CONFIG = dict(
    vision_config=dict(image_size=TILE, patch_size=14, hidden_size=32, intermediate_layers_indices=[0, 2],
                       vision_output_dim=96, num_hidden_layers=3, num_global_layers=1, attention_heads=4,
                       intermediate_size=64, max_num_tiles=4),
    text_config=dict(vocab_size=128256, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64, cross_attention_layers=[1, 3],
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}),
    image_token_index=128256,
)


def tiny_hf_model(config: dict, seed: int = 0):
    """A random `MllamaForConditionalGeneration` with every gate non-zero, so gated paths are exercised (HF
    initialises some to 0)."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = MllamaConfig(**config)
    cfg._attn_implementation = "eager"
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.copy_(torch.empty(1).uniform_(0.3, 1.2))
    return model


@functools.lru_cache(maxsize=1)
def _real_photo_arrays() -> tuple[tuple[str, np.ndarray], ...]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
             "retina", "logo", "clock", "moon", "page"]
    photos = [(name, getattr(skimage.data, name)()) for name in names]
    samples = load_sample_images()
    for filename, array in zip(samples.filenames, samples.images):
        photos.append((os.path.splitext(os.path.basename(filename))[0], array))
    return tuple(photos)


def real_photos() -> list[tuple[str, Image.Image]]:
    """Real photographs shipped inside scikit-image and scikit-learn (load offline), as fresh PIL images."""
    return [(name, Image.fromarray(array)) for name, array in _real_photo_arrays()]


def multilingual_texts() -> list[str]:
    """Short and long texts in many scripts, plus one text that tokenises to more than 256 tokens."""
    long_text = " ".join(
        f"Sentence {i}: the quick brown fox jumps over the lazy dog near the river bank at dawn." for i in range(40)
    )
    return [
        "A cat and a dog.",
        "Represent the given image with the following question: What is in the image\n",
        "Find me an everyday image that matches the given caption: A cat and a dog.\n",
        "一只猫和一只狗在草地上玩耍。",
        "東京タワーの夜景はとても美しいです。",
        "고양이와 개가 함께 잠을 잔다.",
        "قطة وكلب يلعبان في الحديقة.",
        "Кошка и собака играют в саду.",
        "बिल्ली और कुत्ता बगीचे में खेल रहे हैं।",
        "Η γάτα και ο σκύλος παίζουν στον κήπο.",
        "חתול וכלב משחקים בגינה.",
        "แมวกับสุนัขเล่นกันในสวน",
        "Un chat et un chien jouent ensemble 🐱🐶🎉 — très drôle !",
        "Ein Hund läuft über die Straße; Größe: 1,85 m.",
        "emoji only 👩‍👩‍👧‍👦🏳️‍🌈✨",
        "   leading and trailing spaces   ",
        "tabs\tand\nnew\nlines\r\n",
        "",
        long_text,
    ]
