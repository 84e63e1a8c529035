"""params.yaml -> plain values, read as DVC reads it, so `fmnist` and `dvc` never disagree about a value.

The file goes through DVC's own YAML parser (ruamel.yaml, YAML 1.2: ``on`` and ``yes`` are
strings, ``010`` is 10, ``1:30`` is a string, ``1e-3`` is a number, and a key given twice is an
error). ``--set`` overrides go through the code `dvc exp run -S` runs (Hydra's override grammar:
``train.lr=1e-3``, ``+key=value`` to add a key, ``~key`` to drop one), applied to a copy of the
file that is then read again, as DVC reads the file it rewrote. fmnist.config validates what comes out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fmnist import ConfigError

PARAMS_FILE = "params.yaml"
EXAMPLE = "e.g. train.lr=0.01"


def read(path: str | Path = PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """params.yaml as plain values, with ``key=value`` overrides applied as `dvc exp run -S` applies them."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params") from e
    raw = parse(text, str(path))
    if overrides:
        raw = apply_overrides(text, raw, overrides, str(path))
    return raw


def parse(text: str, where: str) -> dict[str, Any]:
    """YAML text as DVC's params reader gives it, or one line naming the file, the line and the problem."""
    from dvc.utils.serialize import YAMLError, parse_yaml

    try:
        raw = parse_yaml(text, where)
    except YAMLError as e:  # DVC's error only says "corrupted"; ruamel's, its cause, says what and where
        cause = e.__cause__
        mark = getattr(cause, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(cause, 'problem', None) or cause or e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values")
    return raw


def apply_overrides(text: str, raw: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    where: str) -> dict[str, Any]:
    """The file ``text`` (read as ``raw``) with ``overrides`` applied by DVC's `exp run -S` code.

    A key must already exist unless the override adds it (``+key=value``), as with `dvc exp run -S`.
    A sweep (``seed=1,2,3``, ``range(...)``) is several runs, which only `dvc exp run --queue` makes."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply, to_hydra_overrides
    from hydra.errors import OverrideParseException

    for item in overrides:
        try:
            [override] = to_hydra_overrides([item])
        except OverrideParseException as e:
            raise ConfigError(f"--set {item!r}: expected key=value as `dvc exp run -S` takes it ({EXAMPLE}): "
                              f"{_one_line(e)}") from e
        if not override.key_or_group:
            raise ConfigError(f"--set {item!r}: expected key=value ({EXAMPLE})")
        if override.is_sweep_override():
            raise ConfigError(f"--set {item!r}: a sweep is several runs; queue them with "
                              f"`dvc exp run --queue -S {item}`, then `dvc exp run --run-all`")
    with tempfile.TemporaryDirectory(prefix="fmnist-params-") as tmp:
        copy = Path(tmp) / Path(PARAMS_FILE).name
        copy.write_text(text)
        for item in overrides:  # one at a time (as Hydra applies a list), so an error names its override
            try:
                dvc_apply(copy, [item])
            except InvalidArgumentError as e:
                raise ConfigError(f"--set {item!r}: {_why(raw, item, e.__cause__ or e)}") from e
        return parse(copy.read_text(), where)


def _why(raw: dict[str, Any], item: str, error: BaseException) -> str:
    """What is wrong with an override DVC refused: the key it names that params.yaml lacks, and the
    keys there are at that level; otherwise Hydra's own reason, on one line."""
    key = item.partition("=")[0]
    if key[:1] not in "+~":
        node: Any = raw
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict):
                return f"{'.'.join(parts[:i])!r} is a value, not a section of params.yaml"
            if part not in node:
                return (f"no key {'.'.join(parts[:i + 1])!r} in params.yaml (use +{item} to add one); "
                        f"allowed: {', '.join(sorted(map(str, node)))}")
            node = node[part]
    return _one_line(error)


def _one_line(error: BaseException) -> str:
    lines = [line.strip().rstrip(".") for line in str(error).splitlines()]
    return "; ".join(line for line in lines if line and not line.startswith("See https://"))
