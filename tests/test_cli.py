"""The `fmnist` command's help: every subcommand answers --help (argparse formats each help text,
so a stray % in one breaks it) without importing torch or mlflow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fmnist import cli

COMMANDS = sorted(cli.build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in COMMANDS)], ids=lambda a: " ".join(a))
def test_help_answers(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fmnist") and "%%" not in out


def test_help_imports_no_heavy_library():
    code = ("import sys; from fmnist import cli\ntry: cli.main(['--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'mlflow', 'dvc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
