"""Every command's --help shows an example, and every option and argument says what it is for (#10)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from captioner.cli import cli


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    yield path, group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(_commands(cli))


def test_the_walk_finds_the_commands():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"caption", "train", "evaluate", "export", "serve", "data samples", "pipeline run", "runs show"} <= names


@pytest.mark.parametrize("path,command", COMMANDS[1:], ids=[" ".join(p) for p, _ in COMMANDS[1:]])
def test_help_has_an_example_and_every_option_and_argument_is_explained(path, command):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output, f"`captioner {' '.join(path)} --help` shows no example"
    example = result.output.split("Example:", 1)[1]
    assert f"captioner {' '.join(path)}" in example, "the example does not run this command"
    for param in command.params:
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"{'/'.join(param.opts)} of `captioner {' '.join(path)}` has no help"
        else:
            # click arguments carry no help text: the command's text must name them (IMAGE, RUN_ID, ...).
            name = param.human_readable_name.upper().rstrip("S.")
            assert name in (command.help or ""), f"argument {name} of `captioner {' '.join(path)}` is not explained"
