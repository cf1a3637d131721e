"""``serve``'s settings from flags, TRIOCLONE_* variables and a TOML file.

Everything here runs ``trioclone.cli.main`` in this process with a
monkeypatched environment, and reads the effective settings back from
``serve --print-config json`` (which checks them as a start would, and
starts nothing).  The rejection tests also show nothing was started: the
server class is replaced by one that fails the test if it is made.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trioclone import cli, cli_client
from trioclone.cli import (
    build_parser,
    child_environment,
    local_pair_commands,
    serve_settings_table,
    setting_parsers,
)
from trioclone.config import FLAG_ONLY, resolve
from trioclone.curve import write_key_pair
from trioclone.logformat import JsonLines

#: A good value of every setting other than its default, as the file writes
#: it (TOML).  A new serve option needs a row here: the tests below show it
#: works from a flag, the environment and the file.
#: Where the security settings' samples are: real files, as a server (and
#: --print-config) reads the keys before anything else.
KEYS = Path(tempfile.gettempdir()) / f"trioclone-config-keys-{os.getpid()}"


@pytest.fixture(autouse=True, scope="module")
def _keys() -> Iterator[None]:
    (KEYS / "clients").mkdir(parents=True)
    write_key_pair(KEYS, "pair")
    (KEYS / "permissions.toml").write_text("[default]\nwrite = []\n")
    yield
    shutil.rmtree(KEYS)


SAMPLES: dict[str, Any] = {
    "log-level": "DEBUG",
    "log-format": "json",
    "standalone": True,
    "role": "backup",
    "pair": True,
    "port": 7000,
    "bind": "127.0.0.1",
    "peer": "otherhost",
    "peer-port": 7010,
    "state-port": 7020,
    "peer-state-port": 7021,
    "data-dir": "/srv/trioclone",
    "in-memory": True,
    "fsync": "interval",
    "reset-data": True,
    "curve-secret": f"{KEYS}/pair.key_secret",
    "curve-clients": f"{KEYS}/clients",
    "permissions": f"{KEYS}/permissions.toml",
    "heartbeat": 0.5,
    "peer-expiry": 3,
    "hugz": 0.25,
    "sync-timeout": 3,
    "pending-size": 10,
    "pending-age": 4.5,
    "status-interval": 5,
    "applied-horizon": 90,
    "applied-limit": 5000,
    "backlog-limit": 6000,
    "snapshot-stall": 7,
    "publisher-hwm": 0,
    "metrics-port": 9100,
    "metrics-bind": "0.0.0.0",
}
MODES = {"standalone", "role", "pair"}
#: Refused as true from env or file (config.FLAG_ONLY), by file key.
FLAG_ONLY_KEYS = {dest.replace("_", "-") for dest in FLAG_ONLY}


class Started(Exception):
    """A rejected configuration made a server."""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TRIOCLONE_ variable of the test runner's; nothing can start."""
    for name in list(os.environ):
        if name.startswith("TRIOCLONE_"):
            monkeypatch.delenv(name)

    def refuse(*args: object, **kwargs: object) -> None:
        raise Started("a server was made")

    monkeypatch.setattr(cli, "serve_until_signalled", refuse)
    monkeypatch.setattr(cli, "Supervisor", refuse)


def as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def as_toml(values: dict[str, Any]) -> str:
    def shown(value: Any) -> str:
        if isinstance(value, str):
            return json.dumps(value)
        return as_text(value)

    return "".join(f"{key} = {shown(value)}\n" for key, value in values.items())


def variable(key: str) -> str:
    return "TRIOCLONE_" + key.upper().replace("-", "_")


def effective(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> dict[str, dict[str, Any]]:
    """``serve ARGV --print-config json``: each setting's value and source."""
    assert cli.main(["serve", *argv, "--print-config", "json"]) == 0
    printed: dict[str, dict[str, Any]] = json.loads(capsys.readouterr().out)["settings"]
    return printed


def rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``trioclone ARGV`` exits 2, starting nothing: its stderr."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


#: Settings that need others: the flags given with them in these tests.
COMPANIONS = {
    "curve-secret": ["--curve-clients", f"{KEYS}/clients"],
    "curve-clients": ["--curve-secret", f"{KEYS}/pair.key_secret"],
    "permissions": [
        *("--curve-clients", f"{KEYS}/clients"),
        *("--curve-secret", f"{KEYS}/pair.key_secret"),
    ],
}


def base_mode(key: str) -> list[str]:
    """A mode flag that goes with setting ``key`` (none for a mode setting),
    and the settings it needs."""
    mode = [] if key in MODES else ["--role", "primary"]
    return [*mode, *COMPANIONS.get(key, [])]


def written(value: Any) -> Any:
    """A sample as --print-config json shows it."""
    return float(value) if isinstance(value, float) else value


# --------------------------------------------------------------------------
# one table
# --------------------------------------------------------------------------


def test_every_serve_option_is_a_setting_with_a_sample() -> None:
    keys = [row.key for row in serve_settings_table()]
    assert sorted(keys) == sorted(SAMPLES), "add the new option to SAMPLES"
    serve = setting_parsers(build_parser())[1]
    flags = {s for a in serve._actions for s in a.option_strings if s[:2] == "--"}
    assert flags - {"--help", "--config", "--print-config"} <= {
        row.flag for row in serve_settings_table()
    }


def test_names_are_the_flags() -> None:
    row = next(r for r in serve_settings_table() if r.key == "peer-expiry")
    assert (row.flag, row.variable) == ("--peer-expiry", "TRIOCLONE_PEER_EXPIRY")


# --------------------------------------------------------------------------
# each setting from each source
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_a_setting_from_a_flag(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    value = SAMPLES[key]
    flag = [f"--{key}"] if value is True else [f"--{key}", as_text(value)]
    if key in ("log-level", "log-format"):  # top-level options
        assert (
            cli.main([*flag, "serve", "--role", "primary", "--print-config=json"]) == 0
        )
        got = json.loads(capsys.readouterr().out)["settings"][key]
    else:
        got = effective([*base_mode(key), *flag], capsys)[key]
    assert got == {"value": written(value), "source": "flag", "where": f"--{key}"}


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_a_setting_from_the_environment(
    key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable(key), as_text(SAMPLES[key]))
    if key in FLAG_ONLY_KEYS:
        assert f"{variable(key)}: refused" in rejected(
            ["serve", *base_mode(key)], capsys
        )
        return
    got = effective(base_mode(key), capsys)[key]
    assert got == {
        "value": written(SAMPLES[key]),
        "source": "env",
        "where": variable(key),
    }


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_a_setting_from_the_file(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(as_toml({key: SAMPLES[key]}))
    if key in FLAG_ONLY_KEYS:
        assert f"{key} in {config}: refused" in rejected(
            ["serve", *base_mode(key), "--config", str(config)], capsys
        )
        return
    got = effective([*base_mode(key), "--config", str(config)], capsys)[key]
    assert got == {
        "value": written(SAMPLES[key]),
        "source": "file",
        "where": str(config),
    }


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("1", True), ("YES", True), ("on", True), ("false", False),
     ("0", False), ("no", False), ("off", False)],
)  # fmt: skip
def test_a_switch_from_the_environment_takes_the_usual_words(
    text: str,
    value: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRIOCLONE_IN_MEMORY", text)
    assert effective(["--standalone"], capsys)["in-memory"]["value"] is value


def test_file_numbers_may_be_whole_for_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("heartbeat = 2\nport = 7000\npending-size = 1_000\n")
    got = effective(["--standalone", "--config", str(config)], capsys)
    assert got["heartbeat"]["value"] == 2.0
    assert got["port"]["value"] == 7000
    assert got["pending-size"]["value"] == 1000


def test_the_config_file_can_be_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("hugz = 0.5\n")
    monkeypatch.setenv("TRIOCLONE_CONFIG", str(config))
    assert effective(["--standalone"], capsys)["hugz"]["source"] == "file"
    other = tmp_path / "other.toml"
    other.write_text("hugz = 0.75\n")  # the flag beats the variable
    got = effective(["--standalone", "--config", str(other)], capsys)["hugz"]
    assert got == {"value": 0.75, "source": "file", "where": str(other)}


# --------------------------------------------------------------------------
# precedence
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected", "source"),
    [
        ("0.125", "0.25", "0.5", 0.125, "flag"),
        (None, "0.25", "0.5", 0.25, "env"),
        (None, None, "0.5", 0.5, "file"),
        (None, None, None, 1.0, "default"),
        ("0.125", None, "0.5", 0.125, "flag"),
        ("0.125", "0.25", None, 0.125, "flag"),
    ],
)
def test_flag_beats_environment_beats_file_beats_default(
    flag: str | None,
    env: str | None,
    file: str | None,
    expected: float,
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--standalone"]
    if flag is not None:
        argv += ["--heartbeat", flag]
    if env is not None:
        monkeypatch.setenv("TRIOCLONE_HEARTBEAT", env)
    if file is not None:
        config = tmp_path / "serve.toml"
        config.write_text(f"heartbeat = {file}\n")
        argv += ["--config", str(config)]
    got = effective(argv, capsys)["heartbeat"]
    assert (got["value"], got["source"]) == (expected, source)


def test_a_flag_mode_beats_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('role = "backup"\n')
    got = effective(["--standalone", "--config", str(config)], capsys)
    assert got["standalone"]["value"] is True
    assert got["role"]["value"] is None and got["role"]["source"] == "default"


def test_in_memory_from_the_environment_beats_the_files_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f"data-dir = {json.dumps(str(tmp_path / 'kept'))}\n")
    monkeypatch.setenv("TRIOCLONE_IN_MEMORY", "true")
    argv = ["serve", "--standalone", "--config", str(config), "--print-config"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "in-memory = true" in out and "# env TRIOCLONE_IN_MEMORY" in out
    assert f"data-dir in {config} gave way to TRIOCLONE_IN_MEMORY" in out
    assert not (tmp_path / "kept").exists()


# --------------------------------------------------------------------------
# --print-config
# --------------------------------------------------------------------------


def test_print_config_shows_where_each_setting_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('role = "backup"\npending-size = 10\n')
    monkeypatch.setenv("TRIOCLONE_PORT", "7000")
    argv = ["serve", "--config", str(config), "--hugz", "0.25", "--print-config"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"# config file: {config} (flag --config)" in lines

    def line(key: str) -> str:
        return next(x for x in lines if x.startswith((f"{key} ", f"# {key} ")))

    assert [part.strip() for part in line("hugz").split("#")] == [
        "hugz = 0.25",
        "flag --hugz",
    ]
    assert line("port").endswith("# env TRIOCLONE_PORT")
    assert line("role").startswith('role = "backup"')
    assert line("role").endswith(f"# file {config}")
    assert line("pending-size").endswith(f"# file {config}")
    assert line("heartbeat").startswith("heartbeat = 1.0 ")
    assert line("heartbeat").endswith("# default")
    assert line("peer").startswith("# peer is not set ")


def test_print_config_is_a_config_file_that_gives_the_same_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIOCLONE_SNAPSHOT_STALL", "9")
    first = ["--role", "backup", "--peer", "h", "--heartbeat", "0.3"]
    assert cli.main(["serve", *first, "--print-config"]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "saved.toml"
    saved.write_text(printed)
    assert tomllib.loads(printed)["snapshot-stall"] == 9.0
    monkeypatch.delenv("TRIOCLONE_SNAPSHOT_STALL")
    again = effective(["--config", str(saved)], capsys)
    before = effective(first, capsys)
    assert {k: v["value"] for k, v in again.items()} == {
        k: v["value"] for k, v in before.items()
    } | {"snapshot-stall": 9.0}


def test_print_config_checks_the_settings_as_a_start_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = rejected(
        ["serve", "--role", "primary", "--state-port", "5557", "--print-config"], capsys
    )
    assert "overlap" in err


# --------------------------------------------------------------------------
# rejections: exit 2, the name, where it came from, the reason
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("TRIOCLONE_HEARTBEAT", "0", "must be a positive, finite number of seconds"),
        ("TRIOCLONE_HEARTBEAT", "fast", "'fast' is not a number"),
        ("TRIOCLONE_PEER_EXPIRY", "0.5", "a finite number of heartbeats, at least 1"),
        ("TRIOCLONE_PENDING_SIZE", "1.5", "'1.5' is not a whole number"),
        ("TRIOCLONE_PUBLISHER_HWM", "-1", "a whole number >= 0"),
        ("TRIOCLONE_PORT", "65534", "65534"),
        ("TRIOCLONE_STATE_PORT", "0", "0"),
        ("TRIOCLONE_FSYNC", "sometimes", "must be one of always, interval, off"),
        ("TRIOCLONE_ROLE", "standalone", "must be one of primary, backup"),
        ("TRIOCLONE_LOG_FORMAT", "xml", "must be one of text, json"),
        ("TRIOCLONE_IN_MEMORY", "maybe", "must be true or false"),
        ("TRIOCLONE_PEER", "", "is empty"),
    ],
)
def test_a_bad_environment_value_is_rejected(
    name: str,
    value: str,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    mode = [] if name == "TRIOCLONE_ROLE" else ["--role", "primary"]
    err = rejected(["serve", *mode], capsys)
    flag = "--" + name.removeprefix("TRIOCLONE_").lower().replace("_", "-")
    assert err.startswith(f"trioclone: {name} (for {flag}): "), err
    assert reason in err


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("heartbeat = 0", "must be a positive, finite number of seconds"),
        ("heartbeat = true", "must be a number, not a boolean"),
        ("heartbeat = inf", "must be a positive, finite number of seconds"),
        ("pending-size = 10.0", "'10.0' is not a whole number"),
        ("pending-size = -3", "must be a whole number >= 1"),
        ("bind = 5", "must be text, not a number"),
        ("fsync = 1", "must be one of always, interval, off, not a number"),
        ("in-memory = 1", "must be true or false, not 1"),
        ('in-memory = "yes"', "must be true or false, not 'yes'"),
        ('port = "7000"', "must be a number, not a string"),
        ("heartbeat = [1, 2]", "must be a single value, not a table or array"),
        ("heartbeat = 1979-05-27", "must be a number, not a date"),
        ('role = "leader"', "must be one of primary, backup, not 'leader'"),
    ],
)
def test_a_bad_file_value_is_rejected(
    line: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(line + "\n")
    key = line.split(" = ")[0]
    mode = [] if key == "role" else ["--standalone"]
    err = rejected(["serve", *mode, "--config", str(config)], capsys)
    assert err.startswith(f"trioclone: config file {config}: {key} (for --{key}): "), (
        err
    )
    assert reason in err


def test_an_unknown_file_key_is_rejected_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("port = 7000\npeer_expiry = 3\n")
    err = rejected(["serve", "--standalone", "--config", str(config)], capsys)
    assert f"config file {config}: unknown key 'peer_expiry'" in err
    assert "did you mean peer-expiry?" in err


@pytest.mark.parametrize("text", ["[serve]\nport = 7000\n", "config = 'x.toml'\n"])
def test_a_table_or_the_config_key_is_unknown(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(text)
    err = rejected(["serve", "--standalone", "--config", str(config)], capsys)
    assert "unknown key" in err


def test_a_malformed_file_is_rejected_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('port = 7000\nbind = "127.0.0.1\nhugz = 1\n')
    err = rejected(["serve", "--standalone", "--config", str(config)], capsys)
    assert f"config file {config}: not valid TOML" in err
    assert "line 2" in err


@pytest.mark.parametrize("kind", ["missing", "folder", "unreadable"])
def test_an_unreadable_file_is_rejected(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    if kind == "folder":
        config.mkdir()
    elif kind == "unreadable":
        config.write_text("hugz = 1\n")
        config.chmod(0)
        if os.access(config, os.R_OK):  # root reads it anyway
            pytest.skip("running as root: every file is readable")
    err = rejected(["serve", "--standalone", "--config", str(config)], capsys)
    assert f"config file {config}: cannot read it: " in err


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("TRIOCLONE_PEER_EXPIRYY", "did you mean TRIOCLONE_PEER_EXPIRY?"),
        ("TRIOCLONE_HEARTBEATS", "did you mean TRIOCLONE_HEARTBEAT?"),
        ("TRIOCLONE_SOMETHING", "names no setting"),
    ],
)
def test_a_variable_that_names_no_setting_is_rejected(
    name: str,
    hint: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, "3")
    err = rejected(["serve", "--standalone"], capsys)
    assert err.startswith(f"trioclone: {name} names no setting of trioclone serve")
    assert hint in err


def test_serve_lets_the_client_commands_variables_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIOCLONE_SERVER_KEY", str(tmp_path / "pair.key"))
    monkeypatch.setenv("TRIOCLONE_CLIENT_KEY", str(tmp_path / "me.key_secret"))
    got = effective(["--standalone"], capsys)
    assert all(v["source"] == "default" for k, v in got.items() if k != "standalone")


def test_client_commands_ignore_the_serve_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRIOCLONE_SOMETHING", "3")
    monkeypatch.setenv("TRIOCLONE_HEARTBEAT", "0")
    ran = []

    async def connected(*args: object) -> int:  # no server needed
        ran.append(args)
        return 0

    monkeypatch.setattr(cli_client, "connected", connected)
    assert cli.main(["get", "/k"]) == 0
    assert len(ran) == 1


def test_two_options_of_one_group_from_one_source_are_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(f'standalone = true\ndata-dir = "{tmp_path}"\nin-memory = true\n')
    err = rejected(["serve", "--config", str(config)], capsys)
    assert f"data-dir in {config} and in-memory in {config} do not go together" in err
    monkeypatch.setenv("TRIOCLONE_STANDALONE", "1")
    monkeypatch.setenv("TRIOCLONE_PAIR", "1")
    err = rejected(["serve"], capsys)
    assert "TRIOCLONE_STANDALONE and TRIOCLONE_PAIR do not go together" in err


def test_a_switch_set_false_does_not_choose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIOCLONE_IN_MEMORY", "false")
    monkeypatch.setenv("TRIOCLONE_DATA_DIR", str(tmp_path))
    got = effective(["--standalone"], capsys)
    assert got["data-dir"]["value"] == str(tmp_path)
    assert got["in-memory"] == {
        "value": False,
        "source": "env",
        "where": "TRIOCLONE_IN_MEMORY",
    }


def test_serve_needs_a_mode_from_somewhere(capsys: pytest.CaptureFixture[str]) -> None:
    err = rejected(["serve", "--port", "7000"], capsys)
    assert "serve needs a mode: --standalone, --role primary|backup or --pair" in err


def test_a_clash_names_the_settings_that_came_from_outside(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIOCLONE_PEER", "otherhost")
    err = rejected(["serve", "--pair"], capsys)
    assert "--peer does not go with --pair" in err
    assert "(not from flags: --peer from TRIOCLONE_PEER)" in err
    monkeypatch.delenv("TRIOCLONE_PEER")
    monkeypatch.setenv("TRIOCLONE_STATE_PORT", "5557")
    err = rejected(["serve", "--role", "primary"], capsys)
    assert "overlap (not from flags: --state-port from TRIOCLONE_STATE_PORT)" in err


def test_a_bad_flag_is_still_argparses_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = rejected(["serve", "--standalone", "--heartbeat", "0"], capsys)
    assert "argument --heartbeat: must be a positive, finite number of seconds" in err


# --------------------------------------------------------------------------
# serve --pair: the servers get the effective settings as flags
# --------------------------------------------------------------------------


def test_a_local_pair_passes_settings_from_env_and_file_as_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        f'pair = true\nheartbeat = 0.5\nfsync = "off"\ndata-dir = "{tmp_path}"\n'
        'log-format = "json"\n'
    )
    monkeypatch.setenv("TRIOCLONE_PUBLISHER_HWM", "0")
    monkeypatch.setenv("TRIOCLONE_PORT", "7000")
    monkeypatch.setenv("TRIOCLONE_LOG_LEVEL", "WARNING")
    argv = ["serve", "--config", str(config), "--hugz", "0.25", "--reset-data"]
    args = build_parser().parse_args(argv)
    resolve(build_parser, setting_parsers, argv, args, os.environ)
    commands = local_pair_commands(args)
    parser = build_parser()
    for role, command in commands.items():
        assert "--config" not in command
        child = parser.parse_args(command[3:])
        assert (child.log_level, child.log_format) == ("WARNING", "json")
        assert child.role == role and child.reset_data
        assert (child.heartbeat, child.hugz, child.publisher_hwm) == (0.5, 0.25, 0)
        assert child.fsync == "off"
        assert (
            child.data_dir == tmp_path / f"{role}-{7000 if role == 'primary' else 5566}"
        )
    assert parser.parse_args(commands["backup"][3:]).peer_port == 7000


def test_a_local_pair_passes_the_security_settings_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_key_pair(tmp_path, "pair")
    clients = tmp_path / "clients"
    clients.mkdir()
    write_key_pair(clients, "alice")
    (clients / "alice.key_secret").unlink()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRIOCLONE_CURVE_SECRET", "pair.key_secret")
    config = tmp_path / "serve.toml"
    config.write_text('pair = true\nin-memory = true\ncurve-clients = "clients"\n')
    argv = ["serve", "--config", str(config)]
    args = build_parser().parse_args(argv)
    resolve(build_parser, setting_parsers, argv, args, os.environ)
    parser = build_parser()
    for command in local_pair_commands(args).values():
        assert command.count("--curve-secret") == command.count("--curve-clients") == 1
        child = parser.parse_args(command[3:])
        assert child.curve_secret == tmp_path / "pair.key_secret"
        assert child.curve_clients == clients


def test_a_relative_path_in_the_file_is_from_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "conf" / "serve.toml"
    config.parent.mkdir()
    config.write_text('standalone = true\ndata-dir = "kept"\n')
    monkeypatch.chdir(tmp_path)
    argv = ["serve", "--config", str(config)]
    args = build_parser().parse_args(argv)
    resolve(build_parser, setting_parsers, argv, args, os.environ)
    settings = cli.server_settings(
        args,
        "standalone",
        port=None,
        peer_host="localhost",
        peer_port=None,
        state_port=None,
        peer_state_port=None,
    )
    assert settings.data_dir == "kept"  # as --data-dir kept: under tmp_path


def test_a_local_pairs_servers_get_no_trioclone_variables() -> None:
    environ = {"TRIOCLONE_HEARTBEAT": "3", "PATH": "/bin", "XDG_DATA_HOME": "/d"}
    assert child_environment(environ) == {"PATH": "/bin", "XDG_DATA_HOME": "/d"}


# --------------------------------------------------------------------------
# log formats
# --------------------------------------------------------------------------


def test_json_lines_have_the_documented_fields() -> None:
    record = logging.LogRecord(
        "trioclone.server", logging.WARNING, __file__, 1, "rejected %s", ("x",), None
    )
    record.created = 0.25
    line = json.loads(JsonLines("backup").format(record))
    assert line == {
        "time": "1970-01-01T00:00:00.250Z",
        "level": "WARNING",
        "logger": "trioclone.server",
        "message": "rejected x",
        "server": "backup",
    }


def test_json_lines_carry_the_exception() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), info)
    text = JsonLines(None).format(record)
    assert "\n" not in text  # one line, whatever the message holds
    line = json.loads(text)
    assert "server" not in line
    assert line["exception"].startswith("Traceback")
    assert "ValueError: bad\nthing" in line["exception"]
