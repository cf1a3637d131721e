"""Server settings refuse values that make no sense, naming the setting."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

import pytest

from trioclone.cli_client import count, heartbeats, hwm, seconds
from trioclone.endpoints import Endpoints
from trioclone.errors import ConfigError
from trioclone.server.settings import (
    COUNT,
    HEARTBEATS,
    HWM,
    SECONDS,
    PairSettings,
    Rule,
    ServerSettings,
    check_ports_apart,
    pair_settings,
)

BIND = Endpoints.inproc("settings")
PEER = Endpoints.inproc("settings-peer")

BAD_SECONDS = [math.nan, math.inf, -math.inf, 0.0, -1.0]
SECONDS_FIELDS = [
    "hugz_interval",
    "sync_timeout",
    "sync_retry",
    "pending_age",
    "status_interval",
    "applied_horizon",
    "snapshot_stall",
]
COUNT_FIELDS = ["pending_size", "applied_limit", "backlog_limit"]
BAD_COUNTS: list[Any] = [0, -1, math.nan, math.inf, 2.5, True]


def pair(**options: Any) -> PairSettings:
    return PairSettings(
        primary=True,
        state_bind="inproc://settings-state",
        state_peer="inproc://settings-peer-state",
        peer=PEER,
        **options,
    )


def server(**options: Any) -> ServerSettings:
    return ServerSettings(bind=BIND, **options)


def test_defaults_are_valid() -> None:
    ServerSettings(bind=BIND, pair=pair())


@pytest.mark.parametrize("name", SECONDS_FIELDS)
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_server_settings_reject_bad_seconds(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=name):
        server(**{name: value})


@pytest.mark.parametrize("name", SECONDS_FIELDS)
def test_server_settings_accept_small_and_large_seconds(name: str) -> None:
    server(**{name: 0.001})
    server(**{name: 1e9})


@pytest.mark.parametrize("name", COUNT_FIELDS)
@pytest.mark.parametrize("value", BAD_COUNTS)
def test_server_settings_reject_bad_counts(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name):
        server(**{name: value})


@pytest.mark.parametrize("name", ["publisher_hwm", "collector_hwm"])
def test_high_water_marks_may_be_zero_but_not_negative(name: str) -> None:
    server(**{name: 0})  # ZeroMQ: no limit
    with pytest.raises(ConfigError, match=name):
        server(**{name: -1})


@pytest.mark.parametrize("value", BAD_SECONDS)
def test_pair_settings_reject_a_bad_heartbeat(value: float) -> None:
    with pytest.raises(ConfigError, match="heartbeat"):
        pair(heartbeat=value)


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, 0.5, -2.0])
def test_pair_settings_reject_a_bad_expiry(value: float) -> None:
    with pytest.raises(ConfigError, match="expiry_heartbeats"):
        pair(expiry_heartbeats=value)


def test_pair_settings_accept_an_expiry_of_one_heartbeat_or_more() -> None:
    pair(expiry_heartbeats=1.0)
    pair(expiry_heartbeats=2.5)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"heartbeat": math.inf}, "heartbeat"),
        ({"expiry_heartbeats": math.nan}, "expiry_heartbeats"),
        ({"status_interval": 0.0}, "status_interval"),
        ({"pending_size": 0}, "pending_size"),
        ({"port": 65534}, "out of range"),
        ({"state_port": 0}, "out of range"),
        ({"peer_state_port": 65536}, "out of range"),
        ({"port": 5003}, "overlap"),  # 5003-5005 holds the state port 5003
        ({"port": 7000, "state_port": 7002}, "overlap"),
    ],
)
def test_pair_settings_function_rejects(
    options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        pair_settings("primary", **options)


def test_pair_settings_function_defaults_are_the_guides() -> None:
    primary = pair_settings("primary")
    backup = pair_settings("backup", bind_host="127.0.0.1", peer_host="127.0.0.1")
    assert primary.bind.snapshot == "tcp://*:5556"
    assert primary.pair is not None and backup.pair is not None
    assert primary.pair.state_bind == "tcp://*:5003"
    assert backup.bind.snapshot == "tcp://127.0.0.1:5566"
    assert backup.pair.state_peer == "tcp://127.0.0.1:5003"
    assert backup.pair.peer.snapshot == "tcp://127.0.0.1:5556"
    assert pair_settings("standalone").pair is None


def test_check_ports_apart_names_both_blocks() -> None:
    check_ports_apart({"a": (5556, 3), "b": (5559, 3), "c": (5003, 1)})
    with pytest.raises(ConfigError, match=r"a \(ports 5556-5558\) and b \(port 5558\)"):
        check_ports_apart({"a": (5556, 3), "b": (5558, 1)})


@pytest.mark.parametrize(
    ("option_type", "rule", "parse"),
    [
        (seconds, SECONDS, float),
        (heartbeats, HEARTBEATS, float),
        (count, COUNT, int),
        (hwm, HWM, int),
    ],
)
@pytest.mark.parametrize(
    "text", ["-1", "0", "0.5", "1", "2.5", "100000", "nan", "inf", "1e999"]
)
def test_the_option_types_take_what_the_settings_take(
    option_type: Callable[[str], object],
    rule: Rule,
    parse: Callable[[str], object],
    text: str,
) -> None:
    """``serve``'s number options are the settings' rules, read from text."""
    try:
        value = parse(text)
    except ValueError:
        with pytest.raises(argparse.ArgumentTypeError, match="not a whole number"):
            option_type(text)
        return
    if rule.holds(value):
        assert option_type(text) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(rule.words)):
            option_type(text)
        with pytest.raises(
            ConfigError, match=re.escape(f"the_name must be {rule.words}")
        ):
            rule.check("the_name", value)


def test_seconds_are_numbers_not_flags() -> None:
    with pytest.raises(ConfigError, match="hugz_interval"):
        server(hugz_interval=True)
