import subprocess
import sys

import pytest

from leukray.cli import build_parser

COMMANDS = ["train", "synth", "synth-ood", "evaluate", "calibrate", "score", "tune", "query", "report", "review"]


def test_every_subcommand_is_registered_once():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_each_subcommand(cmd):
    r = subprocess.run([sys.executable, "-m", "leukray.cli", cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"usage: leukray {cmd}" in r.stdout
