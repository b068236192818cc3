"""The one CLI convention: every command's --help shows examples; bad input is one line and exit 2,
`--debug` shows its traceback; a bug is never reported as bad input; `--json` is JSON on stdout."""
import argparse
import json
import subprocess
import sys

import pytest

from hammer.cli import COMMANDS, build_parser, main
from hammer.errors import HammerError
from tests.conftest import REPO


def hammer(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hammer.cli", *argv], cwd=REPO, capture_output=True, text=True)


def parsers_of(parser: argparse.ArgumentParser, name: str):
    """(prog, parser) of a command and of each of its subcommands, depth first."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from parsers_of(subparser, f"{name} {sub}")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_and_subcommand_help_ends_with_an_example_of_itself(command):
    parser = build_parser([command])._subparsers._group_actions[0].choices[command]
    for name, sub in parsers_of(parser, f"hammer {command}"):
        text = sub.format_help()
        examples = text.partition("\nexamples:\n")[2]
        assert examples, f"`{name} --help` shows no examples"
        assert name + " " in examples, f"`{name} --help` has no example of `{name}`:\n{examples}"


def test_help_exits_zero_and_prints_to_stdout(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "merge", "--help"])
    assert exit_.value.code == 0
    assert "examples:\n  hammer tokenizer merge" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "--debug" in out


@pytest.mark.parametrize("argv, message", [
    (["data", "info", "/nonexistent/data"], "hammer data: error: prepared dataset /nonexistent/data not found"),
    (["generate", "--model", "/nowhere", "--prompt", "hi", "--temperature", "-1"],
     "hammer generate: error: temperature must be >= 0 (0 is greedy), got -1.0"),
    (["eval", "--model", "/nowhere"], "hammer eval: error: one of the arguments --data --tasks is required"),
    (["tokenizer", "coverage"], "hammer tokenizer coverage: error: the following arguments are required: path"),
    (["nosuchcommand"], "hammer: error: argument COMMAND: invalid choice: 'nosuchcommand'"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2_without_traceback(argv, message):
    run = hammer(*argv)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(message) and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stdout == "" and "Traceback" not in run.stderr


def test_debug_shows_the_traceback_of_bad_input():
    run = hammer("--debug", "data", "info", "/nonexistent/data")
    assert run.returncode == 1
    assert run.stderr.startswith("Traceback (most recent call last):")
    assert run.stderr.strip().splitlines()[-1] == "FileNotFoundError: prepared dataset /nonexistent/data not found"


@pytest.mark.parametrize("bug", [ValueError("a bug's message"), KeyError("key"), TypeError("types")])
def test_a_bug_keeps_its_traceback_instead_of_passing_for_bad_input(monkeypatch, bug, capsys):
    from hammer.commands import data

    def broken(args):
        raise bug

    monkeypatch.setattr(data, "_info", broken)
    with pytest.raises(type(bug)) as raised:
        main(["data", "info", "anything"])
    assert raised.value is bug
    assert capsys.readouterr().err == ""  # nothing printed as if the user had erred


def test_the_projects_own_errors_and_os_errors_are_one_line_and_ctrl_c_exits_130(monkeypatch, capsys):
    from hammer.commands import data

    for error, code in ((HammerError("bad value 7; expected 8"), 2), (PermissionError("no access to x"), 2),
                        (KeyboardInterrupt(), 130)):
        def fails(args, error=error):
            raise error

        monkeypatch.setattr(data, "_info", fails)
        assert main(["data", "info", "anything"]) == code
        err = capsys.readouterr().err
        assert err == ("" if code == 130 else f"hammer data: error: {error}\n")


def test_a_bug_run_as_a_program_exits_1_with_its_traceback(tmp_path):
    script = ("import sys; from hammer import cli; from hammer.commands import data\n"
              "data._info = lambda args: {}['missing']\n"
              "sys.exit(cli.main(['data', 'info', 'x']))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1
    assert "Traceback" in run.stderr and run.stderr.strip().splitlines()[-1] == "KeyError: 'missing'"


def test_json_is_the_only_thing_on_stdout(tmp_path, capsys):
    from tests.tokenizer_fixtures import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path / "tok")
    assert main(["tokenizer", "coverage", str(tmp_path / "tok"), "--json"]) == 0
    coverage = json.loads(capsys.readouterr().out)
    assert [row["set"] for row in coverage["coverage"]] == ["FCC", "SCC", "TCC"]
    assert main(["data", "demo", "--output", str(tmp_path / "corpus"), "--max-mb", "0.01", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert set(manifest["domains"]) == {"zh", "en", "code"}
    assert main(["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input",
                 str(tmp_path / "corpus" / "valid" / "en.jsonl"), "--output", str(tmp_path / "data"),
                 "--block-size", "16", "--json"]) == 0
    index = json.loads(capsys.readouterr().out)
    assert main(["data", "info", str(tmp_path / "data"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == index and index["blocks"] > 0


def test_every_command_module_lives_in_hammer_commands_but_convert():
    assert {m for m, _ in COMMANDS.values() if not m.startswith("hammer.commands.")} <= {"convert.cli"}
