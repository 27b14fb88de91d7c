"""Tiny random Hugging Face Mllama models and reference forwards, shared by the parity, converter and eval tests."""
import numpy as np
import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration

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


def tiny_hf_model(config: dict, seed: int = 0) -> MllamaForConditionalGeneration:
    """A random HF model with every gate non-zero, so gated paths are exercised (HF initialises some to 0)."""
    torch.manual_seed(seed)
    cfg = MllamaConfig(**config)
    cfg._attn_implementation = "eager"
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.copy_(torch.empty(1).uniform_(0.3, 1.2))
    return model


def random_batch(hf_cfg, lengths, image_rows, grids, seed=0):
    """Right-padded token ids with one image per image row, laid out as `MllamaProcessor` does."""
    rng = np.random.default_rng(seed)
    v, t = hf_cfg.vision_config, hf_cfg.text_config
    b, n, tiles = len(lengths), max(lengths), v.max_num_tiles
    ratios = [tuple(r) for r in v.supported_aspect_ratios]
    ids = np.full((b, n), t.pad_token_id, np.int64)
    mask = np.zeros((b, n), np.int64)
    pixels = np.zeros((b, 1, tiles, 3, v.image_size, v.image_size), np.float32)
    ar_ids = np.zeros((b, 1), np.int64)
    ar_mask = np.zeros((b, 1, tiles), np.int64)
    ar_mask[:, :, 0] = 1
    cross = np.zeros((b, n, 1, tiles), np.int64)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(3, t.vocab_size - 1, length)
        ids[i, 0] = t.bos_token_id
        mask[i, :length] = 1
        if i in image_rows:
            grid = grids[i % len(grids)]
            used = grid[0] * grid[1]
            ids[i, 1] = hf_cfg.image_token_index
            pixels[i, 0, :used] = rng.standard_normal((used, 3, v.image_size, v.image_size))
            ar_ids[i, 0] = ratios.index(tuple(grid)) + 1
            ar_mask[i, 0, :used] = 1
            cross[i, 1:, 0, :used] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, aspect_ratio_ids=ar_ids,
                aspect_ratio_mask=ar_mask, cross_attention_mask=cross,
                has_image=np.array([i in image_rows for i in range(b)]))


def hf_forward(model, batch, rows=None):
    """HF hidden states and last-token embedding, text-only when the selected rows carry no image."""
    rows = list(range(len(batch["input_ids"]))) if rows is None else rows
    sel = {k: torch.from_numpy(np.asarray(v)[rows]) for k, v in batch.items() if k != "has_image"}
    length = int(sel["attention_mask"].sum(1).max())
    inputs = dict(input_ids=sel["input_ids"][:, :length], attention_mask=sel["attention_mask"][:, :length])
    if batch["has_image"][rows].any():
        inputs.update(pixel_values=sel["pixel_values"], aspect_ratio_ids=sel["aspect_ratio_ids"],
                      aspect_ratio_mask=sel["aspect_ratio_mask"],
                      cross_attention_mask=sel["cross_attention_mask"][:, :length])
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    last = inputs["attention_mask"].sum(1) - 1
    pooled = out.hidden_states[-1][torch.arange(len(rows)), last].float()
    return hidden, torch.nn.functional.normalize(pooled, dim=-1).numpy()


def hf_embed_items(model, processor, items):
    """HF `MllamaProcessor` + model + mmE5 pooling, one item at a time (the independent reference)."""
    from mme5_jax.processing import model_string

    out = []
    for item in items:
        text = model_string(item["text"], item["image"] is not None)
        kwargs = dict(images=[[item["image"]]]) if item["image"] is not None else {}
        inputs = processor(text=[text], return_tensors="pt", truncation=True, max_length=256, **kwargs)
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
        pooled = hidden[0, int(inputs["attention_mask"].sum()) - 1].float()
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.stack(out)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
