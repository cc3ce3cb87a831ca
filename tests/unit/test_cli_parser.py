"""The CLI builds only the subparser argv names: the same help, usage and errors."""

from __future__ import annotations

import contextlib
import io

import pytest

from glassroom.interfaces import cli


def _output(parser_args: list[str], only: str | None) -> tuple[int | str | None, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.build_parser(only).parse_args(parser_args)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", sorted(cli._COMMANDS))
def test_one_command_parses_as_the_whole_parser_does(command: str) -> None:
    for args in ([command, "--help"], [command, "--no-such-option"], ["--audit-log", "x", command]):
        assert _output(args, command) == _output(args, None), args


@pytest.mark.parametrize(("args", "named"), [
    (["run", "--", "true"], "run"),
    (["--audit-log", "a.jsonl", "run", "--", "true"], "run"),
    (["--audit-log=a.jsonl", "audit", "verify"], "audit"),
    (["--help"], None),
    (["-h", "run"], None),
    (["bogus"], None),
    ([], None),
    (["--audit-log"], None),
])  # fmt: skip
def test_the_command_named(args: list[str], named: str | None) -> None:
    assert cli._command_named(args) == named


def test_an_unknown_command_still_lists_every_command() -> None:
    code, _, err = _output(["bogus"], cli._command_named(["bogus"]))
    assert code == 2
    assert "invalid choice: 'bogus'" in err
    for name in cli._COMMANDS:
        assert f"'{name}'" in err
