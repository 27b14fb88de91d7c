"""The shared YAML config loader (`mme5_jax.yaml_config`) and the settings it reads that other modules own."""
import dataclasses
import subprocess
import sys

import pytest

from mme5_jax import yaml_config
from mme5_jax.model import REMAT_POLICIES
from mme5_jax.model.lora_config import AdapterConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 1
    names: tuple[str, ...] = ("a",)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    extra: dict | None = None


class MyError(yaml_config.ConfigError):
    pass


def test_includes_resolve_from_the_cwd_then_the_including_file_then_the_bundled_configs(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "frag.yaml").write_text("name: from_frag\ninner: {size: 2, names: [f]}\n")
    (tmp_path / "conf" / "main.yaml").write_text("include: [frag.yaml, mesh/v5p-64.yaml]\ninner: {size: 3}\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tree = yaml_config.resolve_includes(yaml_config.read_yaml(tmp_path / "conf" / "main.yaml"), tmp_path / "conf")
    assert tree["name"] == "from_frag" and tree["inner"] == {"size": 3, "names": ["f"]}   # the file's keys win
    assert (tree["mesh"]["data"], tree["mesh"]["fsdp"]) == (8, 4)                          # bundled mesh/v5p-64
    (cwd / "frag.yaml").write_text("name: from_cwd\n")
    tree = yaml_config.resolve_includes(yaml_config.read_yaml(tmp_path / "conf" / "main.yaml"), tmp_path / "conf")
    assert tree["name"] == "from_cwd"
    with pytest.raises(yaml_config.ConfigError, match=r"^include: .*nothing.yaml"):
        yaml_config.resolve_includes({"include": "nothing.yaml"}, tmp_path)


def test_overrides_parse_values_as_yaml_and_check_keys_against_the_schema():
    tree = {"name": "n"}
    for override in ("inner.size=3", "inner.names=[x, y]", "extra.deep.key=1.5", "name=null", "include=a.yaml",
                     "include=[b.yaml]"):
        yaml_config.apply_override(tree, override, Outer)
    assert tree == {"name": None, "inner": {"size": 3, "names": ["x", "y"]}, "extra": {"deep": {"key": 1.5}},
                    "include": ["a.yaml", "b.yaml"]}
    for override, message in [("inner.sise=2", "unknown config key 'inner.sise'; did you mean 'inner.size'?"),
                              ("inner.size.x=2", "inner.size has no sub-keys"),
                              ("inner.size", "is not of the form key=value"),
                              ("inner.size=[", "inner.size: cannot parse value")]:
        with pytest.raises(yaml_config.ConfigError, match=message):
            yaml_config.apply_override({}, override, Outer)


def test_build_names_the_nested_key_of_a_bad_value():
    built = yaml_config.build(Outer, {"name": "n", "inner": {"names": ["x", "y"]}})
    assert built == Outer("n", Inner(1, ("x", "y")))
    rules = yaml_config.Rules(choices={"name": ("n", "m")}, positive=frozenset({"inner.size"}))
    for values, message in [({"name": "n", "inner": {"size": "big"}}, "inner.size: expected int, got 'big'"),
                            ({"name": "n", "inner": {"size": 0}}, "inner.size: must be > 0, got 0"),
                            ({"name": "q"}, "name: 'q' is not one of n, m"),
                            ({"name": "n", "inner": {"names": "x"}}, "inner.names: expected a list"),
                            ({"name": "n", "inner": {"nmes": []}}, "unknown config key 'inner.nmes'; did you mean"),
                            ({}, "missing required config key 'name'")]:
        with pytest.raises(yaml_config.ConfigError, match=message):
            yaml_config.build(Outer, values, rules)


def test_load_raises_the_callers_error_class(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: n\ninner: {size: 2}\n")
    assert yaml_config.load(str(path), Outer, ["inner.size=5"], error=MyError).inner.size == 5
    with pytest.raises(MyError, match="inner.size: expected int"):
        yaml_config.load(str(path), Outer, ["inner.size=x"], error=MyError)
    with pytest.raises(MyError, match="not found"):
        yaml_config.load(str(tmp_path / "absent.yaml"), Outer, error=MyError)
    path.write_text("- a list\n")
    with pytest.raises(MyError, match="the top level must be a mapping"):
        yaml_config.load(str(path), Outer, error=MyError)


def test_the_adapter_defaults_of_bench_and_trainer_are_adapter_configs(tmp_path):
    from mme5_jax.bench.runner import adapter_config
    from mme5_jax.bench.runner import load_config as load_bench_config
    from mme5_jax.train import load_config as load_train_config

    path = tmp_path / "bench.yaml"
    path.write_text("model: tiny\n")
    bench = load_bench_config(str(path))
    assert bench["adapter"] == dataclasses.asdict(AdapterConfig()) and adapter_config(bench) == AdapterConfig()
    path = tmp_path / "train.yaml"
    path.write_text("output_dir: x\nmodel: {config: tiny, processor_dir: p}\ndata: {demo_dir: d}\n")
    assert load_train_config(str(path)).adapter == AdapterConfig()
    assert load_train_config(str(path), ["adapter.targets=null"]).adapter == AdapterConfig()


def test_the_flops_model_knows_every_remat_policy():
    from mme5_jax.bench.flops import REMAT_RECOMPUTE

    assert set(REMAT_RECOMPUTE) == set(REMAT_POLICIES)


def test_configs_validate_without_importing_jax():
    code = ("import sys, mme5_jax.train.config, mme5_jax.bench.runner, data_synth.config; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
