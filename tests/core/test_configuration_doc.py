"""docs/configuration.md says what the code does: every setting is in its
table with the right names and default, and its examples are real output."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from trioclone import cli
from trioclone.cli import serve_settings_table
from trioclone.logformat import formatter

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"
ROW = re.compile(
    r"^\| `(--[a-z-]+)` \| `([A-Z_]+)` \| `([a-z-]+)` \| (.+?) \| (.+) \|$"
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TRIOCLONE_"):
            monkeypatch.delenv(name)


def documented() -> dict[str, tuple[str, str, str]]:
    """Each documented flag: its variable, file key and default."""
    rows = {}
    for line in DOC.read_text().splitlines():
        if match := ROW.match(line):
            flag, variable, key, default, _meaning = match.groups()
            assert flag not in rows, f"{flag} is documented twice"
            rows[flag] = (variable, key, default)
    return rows


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def test_every_setting_is_documented_with_its_names_and_default() -> None:
    rows = documented()
    table = serve_settings_table()
    assert sorted(rows) == sorted(row.flag for row in table)
    for row in table:
        variable, key, default = rows[row.flag]
        assert (variable, key) == (row.variable, row.key)
        value = row.action.default
        if value is None:
            assert default.startswith("not set"), row.flag
        else:
            assert default == f"`{toml_value(value)}`", row.flag


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_the_example_file_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (example,) = blocks("toml")
    config = tmp_path / "primary.toml"
    config.write_text(example)
    assert cli.main(["serve", "--config", str(config), "--print-config=json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    for key, value in tomllib.loads(example).items():
        assert settings[key] == {"value": value, "source": "file", "where": str(config)}


def shell_examples() -> list[tuple[dict[str, str], list[str], list[str]]]:
    """Each ``$ [VAR=value] trioclone ...`` of the doc: its environment,
    arguments and the lines shown after it."""
    found = []
    for block in blocks(""):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("$ "):
                continue
            words = shlex.split(line[2:])
            env = dict(w.split("=", 1) for w in words if "=" in w.split("-")[0])
            argv = words[len(env) + 1 :]
            shown = []
            for after in lines[i + 1 :]:
                if after.startswith("$ "):
                    break
                shown.append(after)
            found.append((env, argv, shown))
    return found


def test_the_shell_examples_show_real_output(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "serve.toml").write_text('role = "backup"\n')
    examples = shell_examples()
    assert len(examples) == 3
    for env, argv, shown in examples:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        if "--print-config" not in argv:  # an error the doc shows
            (tmp_path / "serve.toml").write_text("peer_expiry = 3\n")
        try:
            code: Any = cli.main(argv)
        except SystemExit as exit:
            code = exit.code
        out, err = capsys.readouterr()
        printed = (out + err).splitlines()
        for line in shown:
            if line != "...":
                assert line in printed, (argv, line, printed)
        assert code == (0 if "--print-config" in argv else 2)
        for name in env:
            monkeypatch.delenv(name)
        (tmp_path / "serve.toml").write_text('role = "backup"\n')


def test_text_lines_carry_the_role_of_one_side_of_a_pair_only() -> None:
    assert "[primary]" in formatter("text", "primary", "primary")._fmt  # type: ignore[operator]
    assert "[" not in formatter("text", "standalone", None)._fmt  # type: ignore[operator]
