"""The YAML configs that ship inside the package: training recipes, sharding.yaml, model/, mesh/, bench/, synth/.

They are package data, so a wheel install finds them just as a source checkout does. Commands take a user's own
YAML path as given and fall back to these for a bare name (`mme5 train demo`, `model.config: tiny`,
`include=mesh/v5p-64.yaml`, `mme5 bench cpu_small`).
"""
import os
from importlib.resources import files
from pathlib import Path

_ROOT = Path(str(files(__name__)))  # installs are unpacked folders, so callers can open() and list files


class BundledConfigNotFound(FileNotFoundError):
    """Neither a file nor a bundled config; the message lists the bundled configs next to where it was looked for."""


def bundled_config(*parts: str) -> Path:
    """The bundled file or folder at `parts` below mme5_jax/configs, e.g. bundled_config("mesh", "v5p-64.yaml")."""
    path = _ROOT.joinpath(*parts)
    if not path.exists():
        raise BundledConfigNotFound(f"no bundled config {'/'.join(parts)} ({_known(path.parent)})")
    return path


def config_path(name: str | os.PathLike, kind: str = "") -> Path:
    """`name` itself when it is a file, else the bundled `<kind>/<name>` (with `.yaml` added when it has none)."""
    if os.path.isfile(name):
        return Path(name)
    file = str(name) if str(name).endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = _ROOT / kind / file
    if not path.is_file():
        raise BundledConfigNotFound(f"{kind + ' ' if kind else ''}config {str(name)!r} not found: no such file, nor "
                                    f"a bundled {(Path(kind) / file).as_posix()} ({_known(path.parent)})")
    return path


def _known(folder: Path) -> str:
    """The bundled configs in `folder`, or in its nearest bundled parent."""
    root, folder = _ROOT.resolve(), folder.resolve()
    if not folder.is_relative_to(root):
        folder = root
    while not folder.is_dir():
        folder = folder.parent
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    folders = sorted(f"{p.name}/" for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__")
    where = folder.relative_to(root).as_posix()
    return f"bundled in {'configs/' if where == '.' else where + '/'}: {', '.join(names + folders) or 'nothing'}"
