"""The `fmnist` command: every subcommand answers --help (argparse formats each help text, so a stray
% in one breaks it) without importing torch or mlflow; the console script runs a command as a process
of its own (the collector's thresholds, the freeze at the end) and passes its exit status on."""

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


def test_console_script_sets_the_collector_for_one_process():
    from importlib.metadata import entry_points

    [script] = [e for e in entry_points(group="console_scripts") if e.name == "fmnist"]
    assert script.value == "fmnist.cli:console"
    code = ("import gc, sys; from fmnist import cli\nsys.argv = ['fmnist', 'evaluate', 'no-such-model']\n"
            "code = cli.console()\nprint(code, gc.get_threshold() == cli.GC_THRESHOLDS, gc.get_freeze_count() > 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "True", "True"], done.stderr
    assert "no-such-model" in done.stderr
