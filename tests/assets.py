"""Shared offline test fixtures: a real Llama-3 / Mllama processor directory (its tokenizer cached on disk) and
varied images.

Everything here is built from files that ship inside installed packages (no hub, no network), so tests can
compare against `transformers.AutoProcessor` on realistic inputs. The real photos and multilingual texts are in
`mme5_jax.testing`, which the benchmarks in tools/ share.
"""
import functools
import hashlib
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from mme5_jax.llama3_processor import write_processor_dir, tokenizer_model_file, write_tokenizer_files
from mme5_jax.testing import real_photos

# Bump when the tokenizer files written by mme5_jax.llama3_processor change, so stale disk caches are not reused.
_TOKENIZER_BUILD_VERSION = 2


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    """The converted Llama-3 tokenizer files, built once (~7 s) and cached on disk across test processes.

    The cache lives in `$MME5_TEST_CACHE` (default `~/.cache/mme5_jax_tests`), keyed by the source file and the
    tokenizer library versions; it is written to a temporary directory and renamed into place atomically.
    """
    import tokenizers
    import transformers

    stat = os.stat(tokenizer_model_file())
    key = hashlib.sha256(
        f"{_TOKENIZER_BUILD_VERSION}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}:"
        f"{tokenizers.__version__}".encode()
    ).hexdigest()[:16]
    cache_root = os.environ.get("MME5_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mme5_jax_tests"))
    target = os.path.join(cache_root, f"llama3_mllama_tokenizer_{key}")
    complete = os.path.join(target, "tokenizer_config.json")  # written last by the build
    if os.path.isfile(complete):
        return target
    os.makedirs(cache_root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="building_", dir=cache_root)
    write_tokenizer_files(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process got there first (identical files) or left something unusable
        if not os.path.isfile(complete):
            return staging
        shutil.rmtree(staging, ignore_errors=True)
    return target


def make_processor_dir(path: str, image_size: int = 448, max_image_tiles: int = 4, resample: int = 2) -> str:
    """`mme5_jax.llama3_processor.write_processor_dir` with the tokenizer files from the test cache."""
    return write_processor_dir(path, image_size, max_image_tiles, resample, tokenizer_files=_tokenizer_dir())


def varied_images() -> list[tuple[str, Image.Image]]:
    """Deterministic images of many sizes, aspect ratios and PIL modes, cut from the real photos."""
    photos = dict(real_photos())
    astronaut, coffee, rocket, chelsea = photos["astronaut"], photos["coffee"], photos["rocket"], photos["chelsea"]
    retina, logo, camera = photos["retina"], photos["logo"], photos["camera"]
    images = [
        ("astronaut_rgb_512", astronaut),
        ("coffee_rgb_600x400", coffee),
        ("chelsea_rgb_451x300", chelsea),
        ("rocket_rgb_640x427", rocket),
        ("china_rgb_640x427", photos["china"]),
        ("hubble_rgb_1000x872", photos["hubble_deep_field"]),
        ("retina_rgb_1411", retina),
        ("camera_L_512", camera),
        ("page_L_384x191", photos["page"]),
        ("logo_RGBA_500", logo),
        ("astronaut_RGBA_alpha_gradient", _with_alpha_gradient(astronaut.resize((300, 200)))),
        ("coffee_P_adaptive", coffee.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)),
        ("chelsea_P_transparency", _palette_with_transparency(chelsea)),
        ("rocket_CMYK", rocket.convert("CMYK")),
        ("astronaut_LA", astronaut.convert("LA")),
        ("camera_1bit", camera.convert("1")),
        ("moon_I16", _to_i16(photos["moon"])),
        ("camera_I32", camera.convert("I")),
        ("coffee_F32", photos["coffee"].convert("L").convert("F")),
        ("coffee_YCbCr", coffee.convert("YCbCr")),
        ("astronaut_row_1px_high", astronaut.crop((0, 200, 512, 201))),
        ("rocket_row_1px_high_wide", rocket.resize((1500, 1), Image.Resampling.BILINEAR)),
        ("chelsea_column_1px_wide", chelsea.crop((200, 0, 201, 300))),
        ("astronaut_1x1", astronaut.crop((100, 100, 101, 101))),
        ("coffee_tiny_3x2", coffee.crop((50, 50, 53, 52))),
        ("chelsea_tiny_17x9", chelsea.crop((100, 100, 117, 109))),
        ("rocket_very_wide_2000x60", rocket.resize((2000, 60), Image.Resampling.BILINEAR)),
        ("retina_very_tall_50x1400", retina.crop((600, 0, 650, 1400))),
        ("astronaut_2_high", astronaut.crop((0, 0, 512, 2))),
        ("hubble_crop_449x449", photos["hubble_deep_field"].crop((10, 10, 459, 459))),
        ("hubble_crop_448x448", photos["hubble_deep_field"].crop((0, 0, 448, 448))),
        ("retina_crop_447x895", retina.crop((300, 300, 747, 1195))),
        ("retina_crop_900x450", retina.crop((200, 400, 1100, 850))),
        ("retina_crop_1300x330", retina.crop((50, 500, 1350, 830))),
        ("clock_L_400x300", photos["clock"]),
        ("immuno_rgb_512", photos["immunohistochemistry"]),
        ("flower_rgb_upscaled_odd_691x401", photos["flower"].resize((691, 401), Image.Resampling.BILINEAR)),
    ]
    return images


def _with_alpha_gradient(image: Image.Image) -> Image.Image:
    alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _palette_with_transparency(image: Image.Image) -> Image.Image:
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 0
    return palette


def _to_i16(image: Image.Image) -> Image.Image:
    """A 16-bit grey image whose values span 0..65535, the way scanners and medical images store them."""
    values = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(values)
