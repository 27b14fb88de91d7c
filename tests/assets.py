"""Shared offline test fixtures: a real Llama-3 / Mllama processor directory, real photos, varied images, texts.

Everything here is built from files that ship inside installed packages (no hub, no network), so tests can
compare against `transformers.AutoProcessor` on realistic inputs. The API of this module is imported by other
test files: keep the names and signatures stable.
"""
import functools
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

# Llama 3.1 special-token names in id order from 128000 (the `llama-models` 3.1 list); Mllama adds `<|image|>`
# after them at 128256 instead of taking one of these slots as Meta's own 3.2 tokenizer does.
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
_NUM_SPECIAL_TOKENS = 256
IMAGE_TOKEN = "<|image|>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3 special tokens (ids 128000..128255) followed by Mllama's `<|image|>` (128256)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(_NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))]
    return _NAMED_SPECIAL_TOKENS + reserved + [IMAGE_TOKEN]


# Bump when the tokenizer files written below change, so that stale disk caches are not reused.
_TOKENIZER_BUILD_VERSION = 1


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    """The converted Llama-3 tokenizer files, built once (~7 s) and cached on disk across test processes.

    The cache lives in `$MME5_TEST_CACHE` (default `~/.cache/mme5_jax_tests`), keyed by the source file and the
    tokenizer library versions; it is written to a temporary directory and renamed into place atomically.
    """
    import llama_models.llama3
    import tokenizers
    import transformers

    model_file = os.path.join(os.path.dirname(llama_models.llama3.__file__), "tokenizer.model")
    stat = os.stat(model_file)
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
    _build_tokenizer(model_file, staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process got there first (identical files) or left something unusable
        if not os.path.isfile(complete):
            return staging
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tokenizer(model_file: str, out: str) -> None:
    """Converts the tiktoken BPE from `llama-models` into HF fast-tokenizer files in `out`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=model_file, extra_special_tokens=llama3_special_tokens())
    backend = converter.converted()
    # Like the released Llama-3 tokenizer.json: byte-level offsets, then BOS prepended by the post-processor.
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, 128000)],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(out)
    config_path = os.path.join(out, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    # The released checkpoint names the generic fast tokenizer class; transformers 5.x saves its own alias.
    config.pop("backend", None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", processor_class="MllamaProcessor")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def make_processor_dir(path: str, image_size: int = 448, max_image_tiles: int = 4, resample: int = 2) -> str:
    """Writes a Llama-3.2-Vision style processor directory (tokenizer + image processor config) into `path`.

    `resample` is the PIL filter id stored in preprocessor_config.json (2 = bilinear, 3 = bicubic).
    Returns `path`, which `transformers.AutoProcessor.from_pretrained` loads as an `MllamaProcessor`.
    """
    os.makedirs(path, exist_ok=True)
    source = _tokenizer_dir()
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), os.path.join(path, name))
    preprocessor = {
        "image_processor_type": "MllamaImageProcessor",
        "processor_class": "MllamaProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "max_image_tiles": max_image_tiles,
        "resample": resample,
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }
    with open(os.path.join(path, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(preprocessor, f, indent=2)
    with open(os.path.join(path, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump({"processor_class": "MllamaProcessor"}, f, indent=2)
    return path


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
