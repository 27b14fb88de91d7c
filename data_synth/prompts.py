"""The single-pass "deep thinking" prompt and the strict JSON schema its reply must follow.

One call per sample: the model interprets the image(s), drafts a sample, evaluates the draft, and writes a
revised sample, which is the only part kept (mmE5 section 3). The prompt text is versioned: a change to
it changes PROMPT_VERSION and therefore every sample id, so old and new samples never mix in one run.
"""
import json
from functools import lru_cache
from pathlib import Path

from data_synth.images import encode_image, image_tokens

PROMPT_VERSION = "mme5-synth-v2"

SYSTEM_PROMPT = (
    "You create training data for a multimodal, multilingual embedding model. Each sample pairs a query "
    "with a positive target that matches it and a hard negative target that looks related but does not "
    "match. You reason carefully before writing, and you reply only with the JSON object requested.")

TASK_GUIDE = {
    ("classification", "I->T"): "The query is the image alone; the positive is a short class label that "
                                "classifies it (object, scene, style or attribute) and the negative a plausible "
                                "but wrong label from the same label space.",
    ("classification", "IT->T"): "The query is the image plus a text that says what to classify (for example "
                                 "'the emotion of the person' or 'the type of vehicle'); the positive is the "
                                 "correct label and the negative a close but wrong label.",
    ("vqa", "IT->T"): "The query is the image plus a question that can only be answered by looking at it; the "
                      "positive is the correct answer and the negative an answer that is plausible but wrong.",
    ("retrieval", "I->T"): "The query is the image alone; the positive is a text that describes it well "
                           "(caption, news text or description) and the negative a text describing a similar "
                           "but different image.",
    ("retrieval", "IT->T"): "The query is the image plus a text asking for related knowledge or a "
                            "description of some aspect; the positive text answers it and the negative text "
                            "answers a subtly different request.",
    ("retrieval", "T->IT"): "The query is a text only; the positive is the positive image together with a short "
                            "text about it that the query asks for, and the negative the hard-negative image "
                            "with a text about it.",
    ("retrieval", "T->I"): "The query is a text only that describes the positive image precisely enough to tell "
                           "it apart from the hard-negative image.",
    ("retrieval", "I->I"): "The query is the query image alone and the targets are images: the instruction says "
                           "what relation makes the positive image the right match (same object, scene, style "
                           "...) and the hard-negative image the wrong one.",
    ("retrieval", "IT->I"): "The query is the query image plus a text that modifies it (for example 'the same "
                            "scene at night'); the positive image fits the modified description and the "
                            "hard-negative image does not.",
    ("retrieval", "IT->IT"): "The query is the query image plus a text; the positive is the positive image with "
                             "a text that answers the query, and the negative the hard-negative image with a "
                             "text that does not.",
    ("retrieval", "T->T"): "The query and both targets are texts only: the image merely inspires their topic and "
                           "is not part of the sample, so no field and not the instruction may refer to an image. "
                           "The query is a question or search request about something the image shows or "
                           "suggests; the positive is a passage that answers it and the negative a passage on a "
                           "closely related topic that does not.",
}

STEPS = (
    "Work in one pass, in the JSON fields given by the schema:\n"
    "1. interpretation: describe the image(s) from several angles: general content, objects and their "
    "attributes, context (setting, culture, time, text in the image), and brainstorm task ideas.\n"
    "2. draft: write the instruction, then the sample fields.\n"
    "3. evaluation: judge the draft for relevance to the image(s), plausibility of the negative (hard but "
    "clearly wrong), clarity, and diversity (avoid generic phrasing), and list concrete improvements.\n"
    "4. revised: the final sample with the improvements applied. Only this part is kept.\n"
)


def text_fields(spec):
    """The generated text fields a spec needs, besides the English instruction."""
    return _fields_for(spec.modality)


def _fields_for(modality):
    query_side, target_side = modality.split("->")
    return (["query"] if "T" in query_side else []) + (["positive", "negative"] if "T" in target_side else [])


def _strict_object(properties):
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def response_schema(spec):
    """Strict json_schema for structured outputs; every field is required, no others are allowed."""
    return _schema_for(spec.task, spec.modality)


@lru_cache(maxsize=None)
def _schema_for(task, modality):
    """One schema object per task and modality, shared by all requests (never mutated)."""
    string = {"type": "string"}
    sample = _strict_object({name: string for name in ["instruction", *_fields_for(modality)]})
    schema = _strict_object({
        "interpretation": _strict_object({k: string for k in ("general", "objects", "context", "task_ideas")}),
        "draft": sample,
        "evaluation": _strict_object({k: string for k in ("relevance", "negative_plausibility", "clarity",
                                                         "diversity", "improvements")}),
        "revised": sample,
    })
    name = f"{task}_{modality.replace('->', '_to_')}"
    return {"name": name, "strict": True, "schema": schema}


@lru_cache(maxsize=None)
def _schema_bytes(task, modality):
    return len(json.dumps(_schema_for(task, modality)).encode())


def _image_roles(spec):
    """(role, path) of the images shown; a sample without images (T->T) is shown its anchor as inspiration."""
    roles = [(role, path) for role, path in (("query image", spec.qry_image), ("positive image", spec.pos_image),
                                             ("hard-negative image", spec.neg_image)) if path is not None]
    return roles or [("image that inspires the sample (it is not part of the sample)", spec.anchor)]


def user_text(spec, language_name):
    fields = text_fields(spec)
    lines = [f"Task: {spec.task}. Modality: {spec.modality} (query -> target).",
             TASK_GUIDE[(spec.task, spec.modality)]]
    if "query" in fields:
        lines.append("The instruction is one English sentence telling the embedding model what to retrieve; the "
                     "query text follows it, so it ends with a colon (for example 'Find the answer to the "
                     "following question:').")
    else:
        lines.append("The instruction is one English sentence telling the embedding model what to retrieve (for "
                     "example 'Retrieve the caption that best describes the given image.').")
    if fields:
        lines.append(f"Write the fields {', '.join(fields)} in {language_name} (language code: {spec.language}), "
                     "natural and fluent for a native speaker.")
    lines.append(STEPS)
    return "\n".join(lines)


def build_request(spec, image_root, *, model, language_name, detail, max_side, max_completion_tokens,
                  temperature):
    """The chat-completions body for `spec`, and an upper bound on its prompt tokens (for budgeting).

    Text can never tokenise to more tokens than UTF-8 bytes, and image tokens follow OpenAI's rule for the
    size actually sent, so the bound holds for any faithful server.
    """
    text = user_text(spec, language_name)
    content = [{"type": "text", "text": text}]
    bound = len(SYSTEM_PROMPT.encode()) + len(text.encode()) + 64
    for role, rel in _image_roles(spec):
        url, size = encode_image(str(Path(image_root) / rel), max_side)
        label = f"The {role}:"
        content += [{"type": "text", "text": label},
                    {"type": "image_url", "image_url": {"url": url, "detail": detail}}]
        bound += len(label.encode()) + image_tokens(size, detail) + 16
    schema = response_schema(spec)
    bound += _schema_bytes(spec.task, spec.modality)
    body = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
        "response_format": {"type": "json_schema", "json_schema": schema},
        "max_completion_tokens": max_completion_tokens,
        "temperature": temperature,
    }
    return body, bound
