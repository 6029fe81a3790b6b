"""The dermaloop command lists every subcommand and each built one answers --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dermaloop.cli import COMMANDS, _available, main


def dermaloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermaloop", *args], capture_output=True, text=True)


def test_help_lists_every_subcommand():
    result = dermaloop("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert f"  {command.name} " in result.stdout


@pytest.mark.parametrize("command", [c for c in COMMANDS if _available(c)], ids=lambda c: c.name)
def test_each_built_subcommand_has_help(command):
    result = dermaloop(command.name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"dermaloop {command.name}" in result.stdout


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "unknown command" in capsys.readouterr().err


def test_unbuilt_command_says_so_instead_of_pretending(capsys, monkeypatch):
    """Every command is built today; a planned one added to the table must still say so."""
    from dermaloop import cli

    planned = cli.Command("someday", None, "a planned command", "a future issue")
    monkeypatch.setattr(cli, "COMMANDS", (*COMMANDS, planned))
    assert main(["someday"]) == 2
    assert "not built yet (a future issue)" in capsys.readouterr().err
