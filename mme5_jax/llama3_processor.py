"""An offline Llama-3.2-Vision processor directory: the real Llama-3 tokenizer from the `llama-models` wheel plus
Mllama's image-processor settings.

Randomly initialised demo models and tests ship no tokenizer and may not reach the hub; this gives them the real
Llama-3 vocabulary in the HF Mllama layout (256 special tokens from 128000, `<|image|>` at 128256).
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

# Llama 3.1 special-token names in id order from 128000 (the `llama-models` 3.1 list); Mllama adds `<|image|>`
# after them at 128256 instead of taking one of these slots as Meta's own 3.2 tokenizer does.
NAMED_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
NUM_SPECIAL_TOKENS = 256
IMAGE_TOKEN = "<|image|>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def special_tokens() -> list[str]:
    """The 256 Llama-3 special tokens (ids 128000..128255) followed by Mllama's `<|image|>` (128256)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))]
    return [*NAMED_SPECIAL_TOKENS, *reserved, IMAGE_TOKEN]


def tokenizer_model_file() -> str:
    """The tiktoken BPE file inside `llama-models`; ImportError names the packages to install."""
    try:
        import llama_models.llama3
    except ImportError:
        raise ImportError("building the offline Llama-3 tokenizer needs the `llama-models` package "
                          "(pip install llama-models tiktoken)") from None
    return os.path.join(os.path.dirname(llama_models.llama3.__file__), "tokenizer.model")


def write_tokenizer_files(out) -> None:
    """Converts the tiktoken BPE into HF fast-tokenizer files in `out` (about 7 s)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=tokenizer_model_file(), extra_special_tokens=special_tokens()).converted()
    # Like the released Llama-3 tokenizer.json: byte-level offsets, then BOS prepended by the post-processor.
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, 128000)])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>",
                                        pad_token="<|finetune_right_pad_id|>", model_max_length=131072,
                                        clean_up_tokenization_spaces=True,
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(out)
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # The released checkpoint names the generic fast tokenizer class; transformers 5.x saves its own alias.
    config.pop("backend", None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", processor_class="MllamaProcessor")
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def write_processor_dir(path, image_size=448, max_image_tiles=4, resample=2, tokenizer_files=None) -> str:
    """Writes a processor directory that `transformers.AutoProcessor` loads as an `MllamaProcessor`; -> `path`.

    `tokenizer_files`: a directory from `write_tokenizer_files` to copy instead of converting again. `resample`
    is the PIL filter id (2 bilinear, 3 bicubic). A new directory appears whole or not at all (staged, renamed);
    into an existing one (e.g. a model directory) the files are moved one by one.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".processor-", dir=path.parent))
    try:
        if tokenizer_files is None:
            write_tokenizer_files(staging)
        else:
            for name in os.listdir(tokenizer_files):
                shutil.copy(os.path.join(tokenizer_files, name), staging / name)
        preprocessor = {"image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
                        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
                        "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                        "max_image_tiles": max_image_tiles, "resample": resample, "rescale_factor": 1 / 255,
                        "size": {"height": image_size, "width": image_size}}
        # The settings go to preprocessor_config.json only: an `image_processor` section in processor_config.json
        # (what transformers 5.x saves) makes 4.46 fail, while 5.x reads preprocessor_config.json without one.
        (staging / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
        (staging / "processor_config.json").write_text(json.dumps({"processor_class": "MllamaProcessor"}),
                                                       encoding="utf-8")
        if path.is_dir():
            for name in os.listdir(staging):
                os.replace(staging / name, path / name)
        else:
            os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(path)
