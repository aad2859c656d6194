"""One name per command: `refrl rl` is the RL command, `grpo` a hidden alias; required
options are marked required in the help (the installed command, as a user runs it)."""

import os
import re
import subprocess
import sys

import pytest


def refrl(*args: str) -> subprocess.CompletedProcess:
    env = {"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}  # one row per option, no colour codes
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def commands_listed(help_text: str) -> list[str]:
    """The command names of the app help's Commands panel."""
    panel = help_text.split("Commands")[1]
    return re.findall(r"^\W*\s([a-z][a-z-]+)\s{2,}", panel, re.M)


def test_rl_is_listed_and_grpo_is_a_hidden_alias():
    res = refrl("--help")
    assert res.returncode == 0, res.stderr
    names = commands_listed(res.stdout)
    assert "rl" in names and "sft" in names and "eval" in names
    assert "grpo" not in names
    assert "SFT, then GRPO with" not in res.stdout and "GRPO, DiffusionNFT, AWM" in " ".join(res.stdout.split())
    alias = refrl("grpo", "--help")  # the alias still works and says what it is
    assert alias.returncode == 0 and "Alias of `refrl rl`" in alias.stdout


def test_rl_and_grpo_take_the_same_options():
    def options(text: str) -> set[str]:
        return set(re.findall(r"--[a-z][a-z-]+", text))

    assert options(refrl("rl", "--help").stdout) == options(refrl("grpo", "--help").stdout)


@pytest.mark.parametrize("command, option", [(["eval"], "--out"), (["generate"], "--ckpt"), (["generate"], "--out"),
                                             (["compare"], "--ckpt"), (["data", "refworld"], "--out"),
                                             (["data", "import"], "--out")])
def test_required_options_are_marked_required(command, option):
    res = refrl(*command, "--help")
    assert res.returncode == 0, res.stderr
    # the options panel's row of the option (rich draws the panel with box characters)
    line = next(line for line in res.stdout.splitlines() if line.startswith("│") and re.search(rf"\s{option}\s", line))
    assert "*" in line.split(option)[0] and "[required]" in line, line


def test_every_required_option_is_required_in_the_parser():
    """The reference generator reads `required` from click; a command that checks an option
    by hand (shown optional, then failing) would be listed as optional there."""
    import typer

    from refrl.cli import app

    root = typer.main.get_command(app)
    eval_out = next(p for p in root.commands["eval"].params if p.name == "out")
    assert eval_out.required
