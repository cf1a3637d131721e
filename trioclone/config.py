"""Where each ``serve`` setting comes from: a flag, the environment, a file.

The ``serve`` command's own argparse options are the one table of server
settings: each option ``--NAME`` (and each top-level log option) is also the
environment variable ``TRIOCLONE_NAME`` (upper case, ``-`` as ``_``) and the
key ``NAME`` of the TOML file given with ``--config`` (the flag's spelling,
without the dashes).  An option added to the parser is a setting in all three
places, checked by the option's own type and choices, and shown by
``--print-config``.  The precedence is flag > environment > file > default.

Options in one mutually exclusive group (the mode: ``--standalone``,
``--role``, ``--pair``; where the map is kept: ``--data-dir``,
``--in-memory``) make up one setting: the highest source that sets any of
them decides it, and two of them set by the same source are refused.
"""

from __future__ import annotations

import argparse
import difflib
import json
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trioclone.errors import ConfigError

ENV_PREFIX = "TRIOCLONE_"
#: The variable that names the file when ``--config`` is not given.
CONFIG_VARIABLE = ENV_PREFIX + "CONFIG"
#: Options of ``serve`` that are not settings: they say how to read them.
NOT_SETTINGS = frozenset({"help", "config", "print_config"})
#: Sources, strongest first.
PRECEDENCE = ("flag", "env", "file", "default")
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
_UNSET: Any = object()  # a probe parser's default: "not on the command line"


@dataclass(frozen=True)
class Source:
    """Where a setting's value came from: ``kind`` is one of PRECEDENCE,
    ``where`` the flag, variable or file path."""

    kind: str
    where: str = ""
    note: str = ""

    def __str__(self) -> str:
        said = f"{self.kind} {self.where}" if self.where else self.kind
        return f"{said} ({self.note})" if self.note else said

    @property
    def rank(self) -> int:
        return PRECEDENCE.index(self.kind)


@dataclass(frozen=True)
class Setting:
    """One row of the table: an option of the parser."""

    action: argparse.Action

    @property
    def flag(self) -> str:
        return next(s for s in self.action.option_strings if s.startswith("--"))

    @property
    def key(self) -> str:
        """The file key: the flag without its dashes ("peer-expiry")."""
        return self.flag.removeprefix("--")

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.key.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def switch(self) -> bool:
        """An on/off flag (``store_true``): true or false in env and file."""
        return self.action.nargs == 0 and self.action.const is True

    @property
    def textual(self) -> bool:
        """Takes text (a host, a path, a choice), not a number."""
        return self.action.choices is not None or self.action.type in (None, str, Path)

    def parse(self, raw: object, where: str, *, typed: bool = False) -> object:
        """``raw`` from the environment (text) or, ``typed``, from a file (a
        TOML value of the setting's type: a boolean, a number or a string),
        through the option's own checks; ConfigError naming ``where``."""
        if isinstance(raw, dict | list):
            raise ConfigError(f"{where}: must be a single value, not a table or array")
        if self.switch:
            if typed and not isinstance(raw, bool):
                raise ConfigError(f"{where}: must be true or false, not {raw!r}")
            return _switch(raw, where)
        if typed and isinstance(raw, str) and not self.textual:
            raise ConfigError(f"{where}: must be {self._kind()}, not a string")
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: must be {self._kind()}, not a boolean")
        if isinstance(raw, int | float):
            if self.textual:
                raise ConfigError(f"{where}: must be {self._kind()}, not a number")
            raw = repr(raw)
        if not isinstance(raw, str):  # a TOML date or time
            what = type(raw).__name__
            raise ConfigError(f"{where}: must be {self._kind()}, not a {what}")
        if raw == "":
            raise ConfigError(f"{where}: is empty")
        convert: Callable[[str], object] = self.action.type or str  # type: ignore[assignment]
        try:
            value = convert(raw)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        choices = self.action.choices
        if choices is not None and value not in choices:
            allowed = ", ".join(map(str, choices))
            raise ConfigError(f"{where}: must be one of {allowed}, not {raw!r}")
        return value

    def _kind(self) -> str:
        if self.action.choices is not None:
            return "one of " + ", ".join(map(str, self.action.choices))
        return "text" if self.textual else "a number"


def _switch(raw: object, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ConfigError(
            f"{where}: must be true or false (or 1/0, yes/no, on/off), not {raw!r}"
        )
    raise ConfigError(f"{where}: must be true or false, not {raw!r}")


def table(parsers: Sequence[argparse.ArgumentParser]) -> list[Setting]:
    """The settings of ``parsers``' options, in order."""
    rows = []
    for parser in parsers:
        for action in parser._actions:
            long = any(s.startswith("--") for s in action.option_strings)
            if long and action.dest not in NOT_SETTINGS:
                rows.append(Setting(action))
    return rows


def groups(parser: argparse.ArgumentParser) -> list[list[str]]:
    """The dests of each mutually exclusive group of ``parser``."""
    return [
        [action.dest for action in group._group_actions]
        for group in parser._mutually_exclusive_groups
    ]


@dataclass
class Effective:
    """The settings a ``serve`` runs with, and where each came from."""

    rows: list[Setting]
    values: dict[str, object]  # by dest
    sources: dict[str, Source]  # by dest
    config: Path | None
    config_source: Source | None

    def from_outside(self, text: str = "") -> list[str]:
        """ "--port from TRIOCLONE_PORT" for each setting not given as a flag
        nor left at its default; only those named in ``text``, if any are."""
        outside = [
            row for row in self.rows if self.sources[row.dest].kind in ("env", "file")
        ]
        named = [row for row in outside if row.flag in text]
        return [f"{row.flag} from {self._origin(row)}" for row in (named or outside)]

    def _origin(self, row: Setting) -> str:
        return said(row, self.sources[row.dest])

    # -- print-config ----------------------------------------------------------

    def render(self, form: str) -> str:
        if form == "json":
            return json.dumps(
                {
                    "config": None if self.config is None else str(self.config),
                    "settings": {
                        row.key: {
                            "value": _plain(self.values[row.dest]),
                            "source": self.sources[row.dest].kind,
                            "where": self.sources[row.dest].where or None,
                        }
                        for row in self.rows
                    },
                },
                indent=1,
            )
        lines = [
            "# trioclone serve: the effective settings and where each came from",
            "# (a flag beats TRIOCLONE_* in the environment, which beats the "
            "--config file, which beats the default)",
        ]
        if self.config is not None:
            lines.append(f"# config file: {self.config} ({self.config_source})")
        assigned = [
            (_assignment(row.key, self.values[row.dest]), self.sources[row.dest])
            for row in self.rows
        ]
        width = max(len(text) for text, _ in assigned)
        lines += [f"{text:<{width}}  # {source}" for text, source in assigned]
        return "\n".join(lines)


def _plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


def _assignment(key: str, value: object) -> str:
    """``key = value`` in TOML; a setting without a value as a comment."""
    if value is None:
        return f"# {key} is not set"
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, int | float):
        shown = repr(value)
    else:
        shown = json.dumps(str(value))  # a TOML basic string
    return f"{key} = {shown}"


# -- resolving ---------------------------------------------------------------------


#: Settings refused as true from the environment or a file, and why.
FLAG_ONLY = {
    "reset_data": "it deletes the map kept in the data folder, at every start "
    "that reads it; give --reset-data as a flag, for the one start that "
    "should begin empty",
}


def resolve(
    build: Callable[[], argparse.ArgumentParser],
    parsers: Callable[[argparse.ArgumentParser], Sequence[argparse.ArgumentParser]],
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    environ: Mapping[str, str],
    others: Collection[str] = (),
) -> Effective:
    """Fill ``args`` (parsed from ``argv`` by ``build()``) with the settings
    from ``environ`` and the config file, as the precedence says.

    ``parsers(parser)`` are the parsers whose options are settings (the
    top-level one and ``serve``'s; the last one's exclusive groups are the
    settings made of several options).  ``others`` are TRIOCLONE_
    variables of other commands, left alone.  ConfigError for anything wrong.
    """
    probe = build()
    probing = parsers(probe)
    rows = table(probing)
    for row in rows:
        row.action.default = _UNSET
    given = vars(probe.parse_args(argv))
    real = {row.dest: row for row in table(parsers(build()))}
    config, config_source = _config_path(given, environ)
    found = {
        "flag": {
            row.dest: (given[row.dest], Source("flag", row.flag))
            for row in rows
            if given.get(row.dest, _UNSET) is not _UNSET
        },
        "env": _from_environment(rows, environ, others),
        "file": {} if config is None else _from_file(rows, config),
    }
    values: dict[str, object] = {}
    sources: dict[str, Source] = {}
    for row in rows:
        for kind in ("flag", "env", "file"):
            if row.dest in found[kind]:
                values[row.dest], sources[row.dest] = found[kind][row.dest]
                break
        else:
            values[row.dest] = real[row.dest].action.default
            sources[row.dest] = Source("default")
    for group in groups(probing[-1]):
        _one_of(group, {row.dest: row for row in rows}, values, sources, real)
    for dest, why in FLAG_ONLY.items():
        source = sources.get(dest)
        if values.get(dest) and source is not None and source.kind != "flag":
            raise ConfigError(f"{said(real[dest], source)}: refused: {why}")
    for dest, value in values.items():
        setattr(args, dest, value)
    return Effective(
        [real[row.dest] for row in rows], values, sources, config, config_source
    )


def _config_path(
    given: Mapping[str, object], environ: Mapping[str, str]
) -> tuple[Path | None, Source | None]:
    flag = given.get("config")
    if isinstance(flag, Path):
        return flag, Source("flag", "--config")
    if flag not in (None, _UNSET):
        return Path(str(flag)), Source("flag", "--config")
    named = environ.get(CONFIG_VARIABLE)
    if named is not None:
        if not named:
            raise ConfigError(f"{CONFIG_VARIABLE}: is empty")
        return Path(named), Source("env", CONFIG_VARIABLE)
    return None, None


def _from_environment(
    rows: Sequence[Setting], environ: Mapping[str, str], others: Collection[str]
) -> dict[str, tuple[object, Source]]:
    by_name = {row.variable: row for row in rows}
    found: dict[str, tuple[object, Source]] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in (CONFIG_VARIABLE, *others):
            continue
        row = by_name.get(name)
        if row is None:
            known = [*by_name, CONFIG_VARIABLE]
            raise ConfigError(
                f"{name} names no setting of trioclone serve{_hint(name, known)} "
                f"(a TRIOCLONE_ variable must be one of the settings in "
                f"docs/configuration.md)"
            )
        where = f"{name} (for {row.flag})"
        found[row.dest] = (row.parse(environ[name], where), Source("env", name))
    return found


def _from_file(rows: Sequence[Setting], path: Path) -> dict[str, tuple[object, Source]]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            f"config file {path}: cannot read it: {exc.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    by_key = {row.key: row for row in rows}
    found: dict[str, tuple[object, Source]] = {}
    for key, raw in data.items():
        row = by_key.get(key)
        if row is None:
            raise ConfigError(
                f"config file {path}: unknown key {key!r}{_hint(key, list(by_key))} "
                f"(keys are the serve flags without the dashes, e.g. peer-expiry)"
            )
        where = f"config file {path}: {key} (for {row.flag})"
        value = row.parse(raw, where, typed=True)
        found[row.dest] = (value, Source("file", str(path)))
    return found


def _hint(name: str, known: Sequence[str]) -> str:
    spelled = name.replace("_", "-") if not name.isupper() else name
    close = difflib.get_close_matches(spelled, known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _one_of(
    group: Sequence[str],
    rows: Mapping[str, Setting],
    values: dict[str, object],
    sources: dict[str, Source],
    real: Mapping[str, Setting],
) -> None:
    """At most one option of an exclusive group is set: the one from the
    highest source; two from the same source are refused."""
    chosen = sorted(
        (dest for dest in group if values[dest] not in (None, False)),
        key=lambda dest: sources[dest].rank,
    )
    if len(chosen) < 2:
        return
    first, second = chosen[0], chosen[1]
    if sources[first].kind == sources[second].kind:
        raise ConfigError(
            f"{said(rows[first], sources[first])} and "
            f"{said(rows[second], sources[second])} do not go together"
        )
    winner = said(rows[first], sources[first])
    for dest in chosen[1:]:
        loser = said(rows[dest], sources[dest])
        values[dest] = real[dest].action.default
        sources[dest] = Source("default", note=f"{loser} gave way to {winner}")


def said(row: Setting, source: Source) -> str:
    """How the source named the setting: --data-dir, TRIOCLONE_DATA_DIR,
    "data-dir in FILE"."""
    if source.kind == "flag":
        return row.flag
    if source.kind == "env":
        return row.variable
    if source.kind == "file":
        return f"{row.key} in {source.where}"
    return row.flag
