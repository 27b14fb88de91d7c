"""Hugging Face torch reference computations (forwards, embeddings, errors), shared by the parity, converter and
eval tests."""
import numpy as np
import torch


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
