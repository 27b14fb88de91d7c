"""Which on-disk layout each transformers release uses, decided in one place.

Tensor keys: transformers 4.4x writes `language_model.model.layers.N...`; 5.x loads `model.language_model.layers.N...`
but renames keys on load (its checkpoint conversion mapping) and reverses that on save, so `save_pretrained` of
either writes the 4.4x keys. config.json: the RoPE keys differ, and each release writes its own. "installed" names
what the installed transformers' `save_pretrained` writes. Nothing here imports transformers: that would import
torch, which takes longer than converting a small model.
"""
LAYOUTS = ("installed", "5", "4.46")


def key_layout(layout: str = "installed") -> str:
    """The tensor key layout `layout` names; "installed" is "4.46" (tests/test_convert.py checks this against the
    installed transformers' `save_pretrained`)."""
    return "4.46" if layout == "installed" else layout


def config_layout(layout: str = "installed") -> str:
    """The config.json layout `layout` names; "installed" reads the installed transformers' version only."""
    if layout != "installed":
        return layout
    from importlib.metadata import version

    return "5" if int(version("transformers").split(".")[0]) >= 5 else "4.46"


def canonical_key(key: str) -> str:
    """Maps transformers 4.4x on-disk keys and 5.x keys onto one canonical layout (`language_model.layers.N...`)."""
    for old, new in (("model.language_model.", "language_model."), ("language_model.model.", "language_model."),
                     ("language_model.lm_head.", "lm_head."), ("model.vision_model.", "vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def installed_key(key: str, layout: str = "5") -> str:
    """The inverse of `canonical_key` for `layout` ("5" = transformers 5.x, "4.46" = released mmE5, "installed")."""
    if key_layout(layout) == "4.46":
        if key.startswith("language_model."):
            return "language_model.model." + key[len("language_model."):]
        if key.startswith("lm_head."):
            return "language_model." + key
        return key
    if key.startswith("lm_head."):
        return key
    return "model." + key


def source_key_layout(raw_keys) -> str:
    """The key layout ("4.46" or "5") of a checkpoint, from its on-disk tensor keys."""
    return "4.46" if any(k.startswith("language_model.model.") for k in raw_keys) else "5"
