"""From a raw chat-completion body to a record, or to the one reason it cannot become one.

Everything here is a pure function of (spec, body), so the same replies always give the same records:
that is what makes a killed-and-resumed run equal to an uninterrupted one.
"""
import json
import re
import unicodedata

from data_synth.layout import IMAGE_TARGET_TEXT, mmeb_text
from data_synth.prompts import PROMPT_VERSION, text_fields
from mme5_jax.records import RecordError, validate_record

SOURCE = "mme5-synth"
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
# A text-only sample's instruction must not send the model looking for an image it will never be given.
_MENTIONS_IMAGE = re.compile(r"\b(image|picture|photo|photograph)s?\b", re.IGNORECASE)

# Unicode character-name prefixes of the letters each ISO 15924 script (synth/languages.yaml) uses.
SCRIPT_PREFIXES = {
    "Latn": ("LATIN",), "Cyrl": ("CYRILLIC",), "Arab": ("ARABIC",), "Hebr": ("HEBREW",), "Grek": ("GREEK",),
    "Deva": ("DEVANAGARI",), "Beng": ("BENGALI",), "Gujr": ("GUJARATI",), "Guru": ("GURMUKHI",),
    "Orya": ("ORIYA",), "Taml": ("TAMIL",), "Telu": ("TELUGU",), "Knda": ("KANNADA",), "Mlym": ("MALAYALAM",),
    "Sinh": ("SINHALA",), "Thai": ("THAI",), "Laoo": ("LAO",), "Mymr": ("MYANMAR",), "Khmr": ("KHMER",),
    "Geor": ("GEORGIAN",), "Armn": ("ARMENIAN",), "Ethi": ("ETHIOPIC",), "Hang": ("HANGUL",),
    "Hani": ("CJK",), "Jpan": ("CJK", "HIRAGANA", "KATAKANA"),
}


class Rejected(Exception):
    """A billed reply that yields no record; `reason` is the failure class counted in summary.json."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def usage_of(body):
    """(prompt_tokens, completion_tokens) billed for a response body, or None if it carries no usage."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def schema_error(value, schema, path="$"):
    """The first place where `value` breaks the (object/string subset of) JSON schema, or None."""
    if schema["type"] == "string":
        return None if isinstance(value, str) else f"{path} must be a string"
    if not isinstance(value, dict):
        return f"{path} must be an object"
    missing = [k for k in schema["required"] if k not in value]
    if missing:
        return f"{path}.{missing[0]} is missing"
    extra = sorted(set(value) - set(schema["properties"]))
    if extra:
        return f"{path}.{extra[0]} is not allowed"
    for key, sub in schema["properties"].items():
        error = schema_error(value[key], sub, f"{path}.{key}")
        if error:
            return error
    return None


def script_share(text, script, max_letters=200):
    """Fraction of the letters in `text` that belong to `script` (None when there are too few letters).

    The first `max_letters` letters decide: enough to tell scripts apart, cheap for long texts.
    """
    letters = [ch for ch in text[:4 * max_letters] if unicodedata.category(ch).startswith("L")][:max_letters]
    if len(letters) < 3:
        return None
    prefixes = SCRIPT_PREFIXES[script]
    return sum(unicodedata.name(ch, "").startswith(prefixes) for ch in letters) / len(letters)


def reply_sample(body, schema):
    """The revised sample of a 200 response body; raises Rejected with the failure class."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        raise Rejected("malformed_body", "no choices")
    choice = body["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise Rejected("malformed_body", "choice has no message")
    if choice.get("finish_reason") == "length":
        raise Rejected("length", "finish_reason=length")
    if message.get("refusal"):
        raise Rejected("refusal", str(message["refusal"])[:200])
    if choice.get("finish_reason") == "content_filter":
        raise Rejected("content_filter")
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        raise Rejected("empty_content")
    try:
        reply = json.loads(content)
    except json.JSONDecodeError as err:
        raise Rejected("schema_invalid", f"content is not JSON ({err.msg})") from None
    error = schema_error(reply, schema["schema"])
    if error:
        raise Rejected("schema_invalid", error)
    return reply["revised"]


def check_sample(spec, sample, script):
    """Quality filters: no empty field, no special tokens, positive != negative, query != positive, no image in
    the instruction of a text-only sample, right script."""
    for name, value in sample.items():
        if not value.strip():
            raise Rejected("quality_empty", f"field {name!r} is empty")
        if _SPECIAL_TOKEN.search(value):
            raise Rejected("quality_special_token", f"field {name!r}")
    if "positive" in sample and sample["positive"].strip().casefold() == sample["negative"].strip().casefold():
        raise Rejected("quality_positive_equals_negative")
    if "query" in sample and "positive" in sample and \
            sample["query"].strip().casefold() == sample["positive"].strip().casefold():
        raise Rejected("quality_query_equals_positive")
    if "I" not in spec.modality and _MENTIONS_IMAGE.search(sample["instruction"]):
        raise Rejected("quality_mentions_image", f"instruction of a {spec.modality} sample")
    if spec.pos_image is not None and spec.pos_image == spec.neg_image:
        raise Rejected("quality_positive_equals_negative", "same image")
    share = script_share(sample["instruction"], "Latn")
    if share is not None and share < 0.5:
        raise Rejected("quality_language", "instruction is not English")
    for name in text_fields(spec):
        share = script_share(sample[name], script)
        if share is not None and share < 0.5:
            raise Rejected("quality_language", f"field {name!r} is not in script {script} of {spec.language!r}")


def make_record(spec, sample, model):
    """The record of a checked sample, every text in the MMEB layout (`mmeb_text`)."""
    return {
        "id": spec.id,
        "source": SOURCE,
        "task": spec.task,
        "modality": spec.modality,
        "language": spec.language,
        "qry_text": mmeb_text(sample["instruction"], sample.get("query")),
        "qry_image": spec.qry_image,
        "pos_text": mmeb_text(sample["positive"]) if "positive" in sample else IMAGE_TARGET_TEXT,
        "pos_image": spec.pos_image,
        "neg_text": [mmeb_text(sample["negative"]) if "negative" in sample else IMAGE_TARGET_TEXT],
        "neg_image": [spec.neg_image],
        "meta": {"prompt_version": PROMPT_VERSION, "model": model},
    }


def record_from_body(spec, body, schema, script, model):
    sample = reply_sample(body, schema)
    check_sample(spec, sample, script)
    record = make_record(spec, sample, model)
    try:
        return validate_record(record)
    except RecordError as err:
        raise Rejected("invalid_record", str(err)) from None
