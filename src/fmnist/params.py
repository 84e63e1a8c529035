"""params.yaml -> plain values: the file read as YAML 1.2 (``lr: 1e-3`` is a number, a key given
twice is an error), and ``key=value`` overrides applied as `dvc exp run -S` applies them.
fmnist.config validates what comes out."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from fmnist import ConfigError

PARAMS_FILE = "params.yaml"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes: ``lr: 1e-3`` is a number (as in YAML 1.2 and
    DVC's parser, not PyYAML's string), and a key given twice is an error, not a silent override."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:  # one line: what and where, not PyYAML's multi-line report
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from e


def read(path: str | Path = PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """params.yaml as plain values, with ``key=value`` overrides applied (as `dvc exp run -S`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params") from e
    raw = _yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    for item in overrides:
        raw = apply_override(raw, item)
    return raw


def apply_override(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """``train.lr=0.01`` -> a copy of raw with that key set. The key must already exist
    (as with `dvc exp run -S`); ``+key=value`` adds a new one."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip("+"):
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
    add = key.startswith("+")
    parts = key.lstrip("+").split(".")
    raw = copy.deepcopy(raw)
    node = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            if not add:
                raise ConfigError(f"--set {item!r}: no key {'.'.join(parts[:i + 1])!r} in params.yaml "
                                  f"(use +{key} to add one); allowed: {', '.join(sorted(map(str, node)))}")
            node[part] = {}
        node = node[part]
    if parts[-1] not in node and not add:
        raise ConfigError(f"--set {item!r}: no key {key!r} in params.yaml (use +{key} to add one); "
                          f"allowed: {', '.join(sorted(map(str, node)))}")
    node[parts[-1]] = _yaml(value, f"--set {item!r}") if value.strip() else None
    return raw
