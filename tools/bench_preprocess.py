"""Per-core preprocessing throughput: `MllamaInputProcessor` against HF `MllamaImageProcessorPil`/`MllamaProcessor`.

Both run in this process, pinned to one CPU core, on the same decoded PIL images, alternating call by call so
that both see the same machine load. Two measurements: single images (the image processor alone) and whole
batches of image+text items (tokenisation, tiles and masks, against `MllamaProcessor`). Prints items/s for each
and the speed-up ratio, and checks on the way that both give the same pixel values. Example:

    python tools/bench_preprocess.py --rounds 5
    python tools/bench_preprocess.py --model /path/to/Llama-3.2-11B-Vision --images /path/to/jpgs
"""
import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

from mme5_jax.processing import MllamaInputProcessor, model_string
from mme5_jax.testing import multilingual_texts, real_photos

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF Mllama or converted checkpoint directory (default: a processor "
                                        "with the offline Llama-3 tokenizer, from mme5_jax.llama3_processor)")
    parser.add_argument("--images", help="directory of image files (default: the real photos shipped in "
                                         "scikit-image and scikit-learn)")
    parser.add_argument("--image-size", type=int, default=448, help="tile size of the default processor")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the image set")
    parser.add_argument("--batch-size", type=int, default=8, help="items per batch in the batch measurement")
    parser.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the first allowed)")
    return parser.parse_args()


def load_images(directory: str | None) -> list[tuple[str, Image.Image]]:
    if directory is None:
        return real_photos()
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise SystemExit(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    images = []
    for name in names:
        image = Image.open(os.path.join(directory, name))
        image.load()
        images.append((name, image))
    return images


def pin_to_one_core(core: int | None) -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0)) if core is None else core
    os.sched_setaffinity(0, {core})
    return core


def main():
    args = parse_args()
    core = pin_to_one_core(args.core)
    model = args.model
    if model is None:
        from mme5_jax.llama3_processor import write_processor_dir

        model = write_processor_dir(tempfile.mkdtemp(prefix="bench_preprocess_"), image_size=args.image_size)

    from transformers import MllamaProcessor

    ours = MllamaInputProcessor.from_pretrained(model)
    hf_processor = MllamaProcessor.from_pretrained(model)
    hf = hf_processor.image_processor
    images = load_images(args.images)

    ours_seconds = hf_seconds = 0.0
    worst_diff = 0.0
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for _, image in images:
            start = time.perf_counter()
            got = ours.preprocess_image(image)["pixel_values"]
            ours_seconds += time.perf_counter() - start
            start = time.perf_counter()
            expected = hf([[image]])["pixel_values"][0, 0]
            hf_seconds += time.perf_counter() - start
            worst_diff = max(worst_diff, float(np.abs(got - expected).max()))

    batch_ours_seconds, batch_hf_seconds, batch_count = time_batches(ours, hf_processor, images, args)

    count = args.rounds * len(images)
    sizes = sorted(image.size for _, image in images)
    print(f"images: {len(images)} x {args.rounds} rounds, sizes {sizes[0]}..{sizes[-1]}, tile {ours.tile_size}, "
          f"max tiles {ours.max_image_tiles}, resample {ours.resample.name}, pinned core {core}")
    print(f"{'single images':<40}{'items/s':>10}{'ms/item':>10}")
    report("MllamaInputProcessor.preprocess_image", count, ours_seconds)
    report("HF MllamaImageProcessorPil", count, hf_seconds)
    print(f"speed-up (ours / HF): {hf_seconds / ours_seconds:.2f}x; max |pixel difference|: {worst_diff:.2e}")
    print(f"{f'batches of {args.batch_size} image+text items':<40}{'items/s':>10}{'ms/item':>10}")
    report("MllamaInputProcessor.__call__", batch_count, batch_ours_seconds)
    report("HF MllamaProcessor.__call__", batch_count, batch_hf_seconds)
    print(f"speed-up (ours / HF): {batch_hf_seconds / batch_ours_seconds:.2f}x")


def time_batches(ours, hf_processor, images, args) -> tuple[float, float, int]:
    """Seconds for whole batches through both processors (tokenisation, tiles, masks), same items."""
    texts = multilingual_texts()
    ours_seconds = hf_seconds = 0.0
    count = 0
    for round_index in tqdm(range(args.rounds), desc="batches"):
        for start in range(0, len(images), args.batch_size):
            chunk = range(start, min(start + args.batch_size, len(images)))
            chunk_texts = [texts[(round_index + i) % len(texts)] for i in chunk]
            items = [{"text": text, "image": images[i][1]} for i, text in zip(chunk, chunk_texts)]
            begin = time.perf_counter()
            ours(items)
            ours_seconds += time.perf_counter() - begin
            begin = time.perf_counter()
            hf_processor(text=[model_string(text, True) for text in chunk_texts],
                         images=[[images[i][1]] for i in chunk],
                         padding=True, truncation=True, max_length=ours.max_length, return_tensors="np")
            hf_seconds += time.perf_counter() - begin
            count += len(items)
    return ours_seconds, hf_seconds, count


def report(name: str, count: int, seconds: float) -> None:
    print(f"{name:<40}{count / seconds:>10.1f}{1000 * seconds / count:>10.2f}")


if __name__ == "__main__":
    main()
