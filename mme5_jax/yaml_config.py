"""YAML configs as frozen dataclasses, shared by `mme5 train`, `mme5 bench` and `mme5-synth`, so that every one
reads, includes, overrides and validates alike and every error names the file or the dotted key.

A config file may `include:` fragments, each a path relative to the cwd, else to the including file, else a bundled
config (`mme5_jax.configs`); the file's own keys win over its fragments. Overrides `key.sub=value` (values parsed as
YAML) win over both; `include=FILE` adds a fragment. Importing this module does not import JAX.
"""
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

import yaml

from mme5_jax.configs import config_path


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the file or the dotted key."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """Value rules beyond the type, by dotted key (items of a list have none)."""

    choices: typing.Mapping[str, typing.Sequence] = dataclasses.field(default_factory=dict)
    positive: frozenset = frozenset()
    non_negative: frozenset = frozenset()


def read_yaml(path) -> dict:
    """The mapping at the top of the YAML file `path` ({} for an empty file)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return tree


def deep_merge(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys set over it, mappings merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = deep_merge(merged[key], value) \
            if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _as_list(value):
    return [] if value is None else value if isinstance(value, list) else [value]


def resolve_includes(tree: dict, directory) -> dict:
    """`tree` merged over its `include` fragments (each resolved likewise), relative to `directory`."""
    includes = _as_list(tree.pop("include", None))
    if not all(isinstance(name, str) for name in includes):
        raise ConfigError(f"include: expected a list of YAML files, got {includes!r}")
    base = {}
    for name in includes:
        path = Path(name) if Path(name).exists() else Path(directory) / name
        try:
            if not path.exists():
                path = config_path(name)
            fragment = read_yaml(path)
        except (FileNotFoundError, ConfigError) as err:
            raise ConfigError(f"include: {err}") from None
        base = deep_merge(base, resolve_includes(fragment, path.parent))
    return deep_merge(base, tree)


def _unknown_key(key, prefix, name, names):
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _is_union(tp):
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _sub_keys(tp):
    """What may stand below a key of type `tp`: a dataclass (its fields), `dict` (any key) or None (nothing)."""
    for arg in typing.get_args(tp) if _is_union(tp) else (tp,):
        if dataclasses.is_dataclass(arg):
            return arg
        if arg is dict or typing.get_origin(arg) is dict:
            return dict
    return None


def apply_override(tree: dict, override: str, schema) -> None:
    """Sets the dotted `key=value` `override` (value parsed as YAML) in `tree`, a raw config of dataclass `schema`;
    `include=FILE` (or a list) adds to its fragments.

    The key is checked against the schema now, so a typo is named before any file is merged."""
    key, sep, text = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key = key.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {text!r}: {err}") from None
    if key == "include":
        tree["include"] = _as_list(tree.get("include")) + _as_list(value)
        return
    parts = key.split(".")
    node, cls = tree, schema
    for depth, part in enumerate(parts):
        if cls is not dict:
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown_key(key, ".".join(parts[:depth]), part, names)
        if depth == len(parts) - 1:
            node[part] = value
            return
        if cls is not dict:
            cls = _sub_keys(typing.get_type_hints(cls)[part])
            if cls is None:
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:depth + 1])} has no sub-keys")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def check_choice(key, value, choices, error: type[ConfigError] = ConfigError):
    """Raises `error` naming `key` unless `value` is one of `choices`; callers use it for a choice list they can only
    import after validation (its owner imports JAX)."""
    if value not in choices:
        raise error(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp)


def _check_value(value, tp, key, rules):
    """`value` as type `tp` (ints are fine as floats, lists as tuples), or ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        for candidate in inner[:-1]:
            try:
                return _check_value(value, candidate, key, rules)
            except ConfigError:
                pass
        return _check_value(value, inner[-1], key, rules)
    if origin in (list, tuple) or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[:1]
        items = [_check_value(v, inner[0], f"{key}[{i}]", rules) if inner else v for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, inner = typing.get_args(tp)
        return {k: _check_value(v, inner, f"{key}.{k}", rules) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)
        if shorthand and isinstance(value, str):
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, rules, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if key in rules.choices:
        check_choice(key, value, rules.choices[key])
    if key in rules.positive and value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    if key in rules.non_negative and value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    return value


def build(cls, values: dict, rules: Rules = Rules(), prefix: str = ""):
    """The dataclass `cls` from the mapping `values`, every key and value checked (nested dataclasses too).

    A dataclass with a class attribute SHORTHAND also accepts a bare string, as {SHORTHAND: string}. A ValueError
    of the dataclass itself is reported under `prefix`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in values:
        if name not in fields:
            raise _unknown_key(f"{prefix}.{name}" if prefix else name, prefix, name, fields)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _check_value(values[name], hints[name], key, rules)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None


def load(path: str | os.PathLike, schema, overrides=(), *, rules: Rules = Rules(), kind: str = "",
         error: type[ConfigError] = ConfigError):
    """The YAML file at `path` (or the bundled `kind` config of that name) with its includes and `overrides`, as a
    `schema` dataclass; any config error is raised as `error`, the caller's own subclass of ConfigError."""
    try:
        try:
            path = config_path(path, kind)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        tree = read_yaml(path)
        for override in overrides:
            apply_override(tree, override, schema)
        return build(schema, resolve_includes(tree, path.parent), rules)
    except ConfigError as err:
        if isinstance(err, error):
            raise
        raise error(str(err)) from None
