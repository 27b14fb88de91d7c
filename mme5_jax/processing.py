"""Mllama model inputs (token ids, image tiles, masks) equal to Hugging Face `MllamaProcessor`, in numpy.

The reference is the installed transformers' `MllamaProcessor` with `MllamaImageProcessorPil`; parity is tested
array for array. Two things are ours on purpose:

* The mmE5 prompt rule (`model_string`): VLM2Vec-format text loses its `<|image_1|>\\n` prefix and image items
  become `<|image|><|begin_of_text|>` + text.
* The mmE5 one-pixel-high fix (`mme5_min_height`, `min_height_fix=True`): mmE5's training collator resized
  images 1 px high to 2 px before the processor; its evaluation did not. It is off by default, so the `Embedder`
  and `mme5 eval` follow HF's processor exactly, and the training pipeline turns it on.

The image-processor settings are read from either layout HF writes (`load_image_processor_config`):
`preprocessor_config.json` (transformers 4.x, the released checkpoints) or the `image_processor` section of
`processor_config.json` (what transformers 5.x saves).

Images are converted to RGB and resized with PIL exactly as HF does; padding, rescaling, normalising and tiling
are fused into one lookup-table gather per tile (a uint8 pixel has only 256 possible float32 results), which
gives bit-identical values several times faster than HF's float64 passes.
"""
import functools
import json
import math
import os
from collections.abc import Mapping

import numpy as np
from PIL import Image

IMAGE_PREFIX_VLM2VEC = "<|image_1|>\n"
VLM2VEC_IMAGE_TOKEN = "<|image_1|>"
IMAGE_TOKEN = "<|image|>"
BOS_TOKEN = "<|begin_of_text|>"
# Pillow's own default warning limit (about 0.25 GB of RGB); files 2x larger are refused by Pillow itself.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
BOS_MODES = ("processor", "single")
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


class BadItemError(ValueError):
    """An input item that cannot be processed; `index` is its position in the batch, `message` the reason."""

    def __init__(self, index: int, message: str):
        super().__init__(f"item {index}: {message}")
        self.index = index
        self.message = message


def model_string(text: str, has_image: bool) -> str:
    """The mmE5 prompt: VLM2Vec image markers removed, then `<|image|><|begin_of_text|>` + text for image items."""
    if text.startswith(IMAGE_PREFIX_VLM2VEC):
        text = text[len(IMAGE_PREFIX_VLM2VEC):]
    text = text.replace(VLM2VEC_IMAGE_TOKEN, "")
    return IMAGE_TOKEN + BOS_TOKEN + text if has_image else text


def build_processor_string(prompt: str) -> str:
    """`MllamaProcessor`'s BOS rule: insert BOS after the leading image tokens unless the prompt has one."""
    if BOS_TOKEN in prompt:
        return prompt
    body = prompt
    while body.startswith(IMAGE_TOKEN):
        body = body[len(IMAGE_TOKEN):]
    num_leading_images = (len(prompt) - len(body)) // len(IMAGE_TOKEN)
    return IMAGE_TOKEN * num_leading_images + BOS_TOKEN + body


def mme5_min_height(image: Image.Image) -> Image.Image:
    """mmE5's fix for images 1 px high: resize them to 2 px high (PIL's default filter) before processing."""
    if image.height == 1:
        return image.resize((image.width, 2))
    return image


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """HF's `convert_to_rgb`: any transparency is composited onto white, everything else is `convert("RGB")`."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@functools.lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Tile grids (rows, columns) with at most `max_image_tiles` tiles; aspect-ratio id = index + 1."""
    return tuple(
        (rows, cols)
        for rows in range(1, max_image_tiles + 1)
        for cols in range(1, max_image_tiles + 1)
        if rows * cols <= max_image_tiles
    )


@functools.lru_cache(maxsize=4096)
def optimal_tile_grid(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """HF's `get_optimal_tiled_canvas`, as a tile grid: the least upscaling, else the least downscaling."""
    grids = np.array(supported_aspect_ratios(max_image_tiles))
    canvas_heights, canvas_widths = (grids * tile_size).T
    scales = np.minimum(canvas_heights / height, canvas_widths / width)
    upscales = scales[scales >= 1]
    selected = upscales.min() if len(upscales) else scales[scales < 1].max()
    candidates = grids[scales == selected]
    rows, cols = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(rows), int(cols)


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """HF's `get_image_size_fit_to_canvas`: aspect-preserving size between one tile and the canvas."""
    target_width = min(max(width, tile_size), canvas_width)
    target_height = min(max(height, tile_size), canvas_height)
    scale_height = target_height / height
    scale_width = target_width / width
    if scale_width < scale_height:
        return min(math.floor(height * scale_width) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_height) or 1, target_width)


def _pixel_lookup_table(do_rescale, rescale_factor, do_normalize, mean, std) -> np.ndarray:
    """[3, 256] float32: HF's rescale (float64, cast to float32) then normalise (float32) of every uint8 value."""
    values = np.arange(256, dtype=np.float64)
    if do_rescale:
        values = values * rescale_factor
    values = np.broadcast_to(values.astype(np.float32), (3, 256))
    if do_normalize:
        mean = np.asarray(mean, dtype=np.float32)[:, None]
        std = np.asarray(std, dtype=np.float32)[:, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def length_buckets(max_length: int, lengths=None, smallest: int = 16) -> tuple[int, ...]:
    """The padded lengths a batch may take, ascending and ending at `max_length`: `lengths` below it, or powers of
    two from `smallest`. A few static shapes mean a few compiles, whoever pads (training or inference)."""
    if lengths is None:
        lengths = [smallest << i for i in range(max(max_length, 1).bit_length())]
    return tuple(sorted({b for b in lengths if b < max_length} | {max_length}))


def bucket_for(buckets, length: int) -> int:
    """The smallest of `buckets` that holds `length` tokens."""
    return next(b for b in buckets if b >= length)


def _read_json_object(path: str) -> dict | None:
    """The JSON object in `path`, or None when there is no such file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _find_image_processor_config(path: str) -> tuple[dict, str] | None:
    """(settings, the file they come from), searched in transformers 5.x's order; None when neither file has them."""
    processor_path = os.path.join(path, PROCESSOR_FILE)
    processor = _read_json_object(processor_path)
    if processor is not None and "image_processor" in processor:
        where = f"{processor_path} (key 'image_processor')"
        if not isinstance(processor["image_processor"], dict):
            raise ValueError(f"{where}: expected an object, got {type(processor['image_processor']).__name__}")
        return processor["image_processor"], where
    config_path = os.path.join(path, IMAGE_PROCESSOR_FILE)
    settings = _read_json_object(config_path)
    return None if settings is None else (settings, config_path)


def _load_image_processor_config(path) -> tuple[dict, str]:
    found = _find_image_processor_config(os.fspath(path))
    if found is None:
        raise FileNotFoundError(f"{os.fspath(path)} has no image-processor settings: expected {IMAGE_PROCESSOR_FILE} "
                                f"or an 'image_processor' section in {PROCESSOR_FILE}")
    return found


def load_image_processor_config(path) -> dict:
    """The Mllama image-processor settings of a model or processor directory saved by any transformers version.

    transformers 4.x (and the released checkpoints) write `preprocessor_config.json`; 5.x writes them only as the
    `image_processor` section of `processor_config.json`. When both exist the section wins, as in transformers 5.x.
    """
    return _load_image_processor_config(path)[0]


def has_image_processor_config(path) -> bool:
    """Whether `load_image_processor_config(path)` finds settings (in either layout)."""
    return _find_image_processor_config(os.fspath(path)) is not None


def portable_processor_files(path) -> dict[str, dict]:
    """Processor config files to write beside copies of `path`'s files so that transformers 4.46 and 5.x both load
    them: `{file name: JSON object}`, empty when `path` has no `image_processor` section to move.

    4.46 passes every key of `processor_config.json` to `MllamaProcessor(...)`, which then gets `image_processor`
    twice and fails; so the section moves to `preprocessor_config.json`, which 5.x reads when there is none.
    """
    processor = _read_json_object(os.path.join(os.fspath(path), PROCESSOR_FILE))
    if processor is None or "image_processor" not in processor:
        return {}
    settings, _ = _load_image_processor_config(path)
    return {IMAGE_PROCESSOR_FILE: settings,
            PROCESSOR_FILE: {k: v for k, v in processor.items() if k != "image_processor"}}


class MllamaInputProcessor:
    """Batches `{"text", "image"}` items into Mllama model inputs, equal to `MllamaProcessor`'s output.

    BOS handling (`bos`), the one switch for matching a checkpoint's training tokenisation:

    * `"processor"` (default): exactly what the installed transformers' `MllamaProcessor` produces with the
      checkpoint's tokenizer files. With transformers 5.x and the Llama-3.2-Vision tokenizer (whose
      post-processor prepends BOS) that is `[128000, 128256, 128000, ...]` for image prompts and
      `[128000, 128000, ...]` for text: the processor inserts one BOS and the tokenizer adds another.
    * `"single"`: the 4.45-era layout with exactly one BOS: `[128256, 128000, ...]` and `[128000, ...]` (the
      processor's BOS insertion, tokenised without the tokenizer's special tokens).

    `min_height_fix=True` resizes images 1 px high to 2 px first, as mmE5's training collator did (not its
    evaluation); it is for training only, since HF's processor does not do it.
    """

    def __init__(self, tokenizer, *, tile_size: int, max_image_tiles: int, resample: int, pixel_lookup: np.ndarray,
                 bos: str = "processor", max_length: int = 256, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 min_height_fix: bool = False):
        _check_bos(bos)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; Mllama checkpoints use <|finetune_right_pad_id|>")
        self.tokenizer = tokenizer
        self.bos = bos
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.min_height_fix = min_height_fix
        self.tile_size = tile_size
        self.max_image_tiles = max_image_tiles
        self.resample = Image.Resampling(resample)
        self.pixel_lookup = pixel_lookup
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id
        self.bos_token_id = tokenizer.bos_token_id

    @classmethod
    def from_pretrained(cls, path: str, *, bos: str = "processor", max_length: int = 256,
                        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                        min_height_fix: bool = False) -> "MllamaInputProcessor":
        """Reads `tokenizer.json`/`tokenizer_config.json` and the image-processor settings (either layout, see
        `load_image_processor_config`) from a HF Mllama directory or a converted checkpoint directory. Missing
        image settings take HF's class defaults."""
        from transformers import PreTrainedTokenizerFast  # the generic fast tokenizer imports no torch

        _check_bos(bos)
        config, config_path = _load_image_processor_config(path)
        for key in ("do_resize", "do_pad", "do_convert_rgb"):
            if not config.get(key, True):
                raise ValueError(f"{config_path}: {key}=false is not supported (MllamaImageProcessor requires it)")
        size = config.get("size", {"height": 224, "width": 224})
        if size.get("height") != size.get("width") or not size.get("height"):
            raise ValueError(f"{config_path}: size must be square with 'height' and 'width', got {size}")
        max_image_tiles = config.get("max_image_tiles", 4)
        if not isinstance(max_image_tiles, int) or max_image_tiles <= 0:
            raise ValueError(f"{config_path}: max_image_tiles must be a positive integer, got {max_image_tiles!r}")
        pixel_lookup = _pixel_lookup_table(
            config.get("do_rescale", True),
            config.get("rescale_factor", 1 / 255),
            config.get("do_normalize", True),
            config.get("image_mean", [0.5, 0.5, 0.5]),
            config.get("image_std", [0.5, 0.5, 0.5]),
        )
        return cls(
            PreTrainedTokenizerFast.from_pretrained(path),
            tile_size=size["height"],
            max_image_tiles=max_image_tiles,
            resample=config.get("resample", Image.Resampling.BILINEAR),
            pixel_lookup=pixel_lookup,
            bos=bos,
            max_length=max_length,
            max_image_pixels=max_image_pixels,
            min_height_fix=min_height_fix,
        )

    def tokenize(self, strings: list[str]) -> list[list[int]]:
        """Token ids of model strings (see `model_string`), truncated to `max_length`, unpadded."""
        prompts = [build_processor_string(s) for s in strings]
        encoded = self.tokenizer(
            prompts, add_special_tokens=self.bos == "processor", truncation=True, max_length=self.max_length
        )
        return encoded["input_ids"]

    def load_image(self, image) -> Image.Image:
        """An opened, fully decoded PIL image within the pixel limit. Paths are opened as mmE5's loader did
        (`Image.open`, no EXIF rotation), unlike HF's own string loader."""
        if isinstance(image, (str, os.PathLike)):
            opened = Image.open(image)
            try:
                self._check_pixels(opened)
                opened.load()
            except BaseException:
                opened.close()
                raise
            return opened
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, a path or None, got {type(image).__name__}")
        self._check_pixels(image)
        return image

    def _check_pixels(self, image: Image.Image) -> None:
        pixels = image.width * image.height
        if pixels > self.max_image_pixels:
            raise ValueError(
                f"image of {image.width}x{image.height} = {pixels} pixels exceeds max_image_pixels="
                f"{self.max_image_pixels} (possible decompression bomb; raise the limit to accept it)"
            )

    def preprocess_image(self, image) -> dict:
        """One image (PIL or path) as `pixel_values` [T_max,3,S,S] float32, `aspect_ratio_id`,
        `aspect_ratio_mask` [T_max] int32 and `num_tiles`."""
        pixel_values = np.zeros((self.max_image_tiles, 3, self.tile_size, self.tile_size), dtype=np.float32)
        grid = self._tiles_into(self.load_image(image), pixel_values)
        return {
            "pixel_values": pixel_values,
            "aspect_ratio_id": self.aspect_ratio_id(grid),
            "aspect_ratio_mask": self.aspect_ratio_mask(grid),
            "num_tiles": grid[0] * grid[1],
        }

    def aspect_ratio_id(self, grid: tuple[int, int]) -> int:
        return supported_aspect_ratios(self.max_image_tiles).index(grid) + 1

    def aspect_ratio_mask(self, grid: tuple[int, int] | None) -> np.ndarray:
        """Valid tiles of an image; like HF, the first tile counts as valid even for a row without an image."""
        mask = np.zeros(self.max_image_tiles, dtype=np.int32)
        mask[: grid[0] * grid[1] if grid else 1] = 1
        return mask

    def _tiles_into(self, image: Image.Image, out: np.ndarray) -> tuple[int, int]:
        """Writes the normalised tiles of `image` into zeroed `out` [T_max,3,S,S]; returns the (rows, cols) grid."""
        image = convert_to_rgb(image)
        if self.min_height_fix:
            image = mme5_min_height(image)
        size = self.tile_size
        rows, cols = optimal_tile_grid(image.height, image.width, self.max_image_tiles, size)
        height, width = fit_to_canvas(image.height, image.width, rows * size, cols * size, size)
        if image.size != (width, height):
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        for row in range(rows):
            top, bottom = row * size, min((row + 1) * size, height)
            for col in range(cols):
                left, right = col * size, min((col + 1) * size, width)
                tile = out[row * cols + col]
                block = pixels[top:bottom, left:right]
                block_height, block_width = max(bottom - top, 0), max(right - left, 0)
                for channel in range(3):
                    lookup = self.pixel_lookup[channel]
                    # HF pads with uint8 zeros before rescaling, so padding becomes lookup[0].
                    tile[channel, :block_height, block_width:] = lookup[0]
                    tile[channel, block_height:] = lookup[0]
                    np.take(lookup, block[:, :, channel], out=tile[channel, :block_height, :block_width], mode="clip")
        return rows, cols

    def __call__(self, items: list[dict], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Model inputs for `{"text": str, "image": None | PIL image | path}` items (text without special
        tokens; `model_string` is applied). Arrays are right-padded to `pad_to` or the longest row; rows
        without an image get zero pixels, aspect-ratio id 0, no cross-attention and, as in HF's mixed
        batches, an aspect-ratio mask with only the first tile set. Bad items raise `BadItemError`."""
        if not items:
            raise ValueError("items is empty")
        strings, images = [], []
        for index, item in enumerate(items):
            if not isinstance(item, Mapping) or not isinstance(item.get("text"), str):
                raise BadItemError(index, f"expected a dict with a str 'text', got {_describe(item)}")
            image = item.get("image")
            if image is not None and not isinstance(image, (str, os.PathLike, Image.Image)):
                raise BadItemError(index, f"'image' must be a PIL image, a path or None, got {type(image).__name__}")
            if IMAGE_TOKEN in item["text"]:
                raise BadItemError(index, f"text contains {IMAGE_TOKEN}; pass plain text, image tokens are added here")
            strings.append(model_string(item["text"], image is not None))
            images.append(image)

        input_ids = self.tokenize(strings)
        length = max(len(ids) for ids in input_ids)
        if pad_to is not None:
            if pad_to < length:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({length} tokens)")
            length = pad_to

        batch = len(items)
        size, tiles = self.tile_size, self.max_image_tiles
        out = {
            "input_ids": np.full((batch, length), self.pad_token_id, dtype=np.int32),
            "attention_mask": np.zeros((batch, length), dtype=np.int32),
            "pixel_values": np.zeros((batch, 1, tiles, 3, size, size), dtype=np.float32),
            "aspect_ratio_ids": np.zeros((batch, 1), dtype=np.int32),
            "aspect_ratio_mask": np.zeros((batch, 1, tiles), dtype=np.int32),
            "cross_attention_mask": np.zeros((batch, length, 1, tiles), dtype=np.int32),
            "has_image": np.array([image is not None for image in images], dtype=bool),
        }
        for index, (ids, image) in enumerate(zip(input_ids, images)):
            out["input_ids"][index, : len(ids)] = ids
            out["attention_mask"][index, : len(ids)] = 1
            grid = None
            if image is not None:
                try:
                    grid = self._tiles_into(self.load_image(image), out["pixel_values"][index, 0])
                except Exception as err:
                    raise BadItemError(index, f"cannot process image {_describe(image)}: {err}") from err
                out["aspect_ratio_ids"][index, 0] = self.aspect_ratio_id(grid)
                if self.image_token_id not in ids:
                    raise BadItemError(index, f"max_length={self.max_length} truncated away the image token")
                # One image per item: it is seen from its own token to the end of the padded row (HF's rule).
                start = ids.index(self.image_token_id)
                out["cross_attention_mask"][index, start:, 0, : grid[0] * grid[1]] = 1
            out["aspect_ratio_mask"][index, 0] = self.aspect_ratio_mask(grid)
        return out


def _check_bos(bos: str) -> None:
    if bos not in BOS_MODES:
        raise ValueError(f"bos must be one of {BOS_MODES}, got {bos!r}")


def _describe(value) -> str:
    if isinstance(value, (str, os.PathLike)):
        return repr(os.fspath(value))
    if isinstance(value, Image.Image):
        return f"<PIL {value.mode} {value.width}x{value.height}>"
    return type(value).__name__
