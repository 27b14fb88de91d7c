"""Encoding throughput of the evaluation path: our `Embedder` against HF torch (`MllamaProcessor` + base model +
last-token pooling) on the same (text, image) items, both batched and grouped by modality, in one process.

Rounds alternate between the two so both see the same machine load; the first pass of ours (which compiles
the static-shape buckets) is reported apart. Also checks that both give the same embeddings. Example:

    python tools/bench_eval.py --rounds 3
    python tools/bench_eval.py --model /path/to/Llama-3.2-11B-Vision --dtype bfloat16
"""
import argparse
import os
import tempfile
import time

import numpy as np

from mme5_jax.model import DTYPES
from mme5_jax.processing import model_string
from mme5_jax.testing import multilingual_texts, real_photos

PROMPTS = ["<|image_1|>\nRepresent the given image.\n",
           "<|image_1|>\nRepresent the given image for classification\n",
           "<|image_1|>\nRepresent the given image with the following question: What is in the image\n"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF Mllama directory (default: the tiny random model of the tests, with "
                                        "the real Llama-3 tokenizer)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def make_items(image_dir):
    """Image items (real photos saved as files, three MMEB prompts each) and multilingual text items."""
    items = []
    for name, photo in real_photos():
        path = os.path.join(image_dir, f"{name}.png")
        photo.convert("RGB").save(path)
        items += [{"text": prompt, "image": path} for prompt in PROMPTS]
    texts = multilingual_texts()
    items += [{"text": f"{t} ({i})", "image": None} for i in range(3) for t in texts]
    return items


def tiny_model(directory):
    from mme5_jax.llama3_processor import write_processor_dir
    from mme5_jax.testing import REAL_TOKENIZER_CONFIG, TILE, tiny_hf_model

    tiny_hf_model(REAL_TOKENIZER_CONFIG).save_pretrained(directory)
    return write_processor_dir(directory, image_size=TILE, max_image_tiles=4)


def hf_encoder(path, dtype, batch_size):
    """HF torch embeddings, batched per modality like ours: processor, model, last non-pad token, L2 norm."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = MllamaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32 if dtype == "float32" else torch.bfloat16).eval()

    def encode(items):
        out = np.zeros((len(items), model.config.text_config.hidden_size), np.float32)
        groups = {}
        for i, item in enumerate(items):
            groups.setdefault(item["image"] is not None, []).append(i)
        for has_image, index in groups.items():
            for start in range(0, len(index), batch_size):
                rows = index[start:start + batch_size]
                texts = [model_string(items[i]["text"], has_image) for i in rows]
                kwargs = dict(images=[[Image.open(items[i]["image"])] for i in rows]) if has_image else {}
                inputs = processor(text=texts, return_tensors="pt", padding=True, truncation=True, max_length=256,
                                   **kwargs)
                with torch.no_grad():  # the base model: no lm_head logits, which an embedder never needs
                    hidden = model.model(**inputs).last_hidden_state
                last = inputs["attention_mask"].sum(1) - 1
                pooled = hidden[torch.arange(len(rows)), last].float()
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    return encode


def main():
    args = parse_args()
    from mme5_jax import Embedder

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tiny_model(os.path.join(tmp, "model"))
        os.makedirs(os.path.join(tmp, "images"))
        items = make_items(os.path.join(tmp, "images"))
        ours = Embedder.from_pretrained(path, args.dtype, batch_size=args.batch_size)
        hf = hf_encoder(path, args.dtype, args.batch_size)
        start = time.perf_counter()
        first = ours.encode(items, progress=False)
        compile_pass = time.perf_counter() - start
        reference = hf(items)
        cosine = np.sum(first * reference, axis=1).min()
        times = {"ours": [], "hf": []}
        for _ in range(args.rounds):
            for name, encode in (("ours", lambda batch: ours.encode(batch, progress=False)), ("hf", hf)):
                start = time.perf_counter()
                encode(items)
                times[name].append(time.perf_counter() - start)
    n_image = sum(item["image"] is not None for item in items)
    rate = {name: len(items) / np.median(t) for name, t in times.items()}
    print(f"items: {len(items)} ({n_image} with an image), batch {args.batch_size}, {args.dtype}, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} rounds")
    print(f"ours first pass (compiles buckets): {compile_pass:.1f} s")
    print(f"ours  {rate['ours']:8.1f} items/s")
    print(f"HF    {rate['hf']:8.1f} items/s")
    print(f"ratio ours/HF: {rate['ours'] / rate['hf']:.2f}x; min cosine ours vs HF: {cosine:.7f}")


if __name__ == "__main__":
    main()
