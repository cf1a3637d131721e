"""The status request and reply on the wire, the durations histogram, and
what ``trioclone status`` prints and exits with."""

from __future__ import annotations

import json
import math

import pytest

from trioclone.cli_status import exit_code, render_json, render_table
from trioclone.client.status import ServerStatus
from trioclone.core.chp import ICANHAZ, decode_request
from trioclone.core.status import (
    RULE_STATUS_REPLY,
    RULE_STATUS_REQUEST,
    STATUS_REQUEST,
    check_status_request,
    decode_status_reply,
    encode_status_reply,
    encode_status_request,
    is_status_request,
)
from trioclone.endpoints import Endpoints
from trioclone.errors import RemoteProtocolError
from trioclone.server.durations import Durations


def test_a_status_request_is_one_frame_no_guide_client_sends():
    request = encode_status_request()
    assert request == [b"STATUS?"]
    assert is_status_request(request)
    check_status_request(request)
    # It is not a snapshot request: a Guide server's decoder refuses it, and
    # an ICANHAZ is not a status request.
    with pytest.raises(RemoteProtocolError):
        decode_request(request)
    assert not is_status_request([ICANHAZ, b""])
    assert not is_status_request([])


@pytest.mark.parametrize(
    "frames",
    [[STATUS_REQUEST, b""], [STATUS_REQUEST, b"x", b"y"]],
)
def test_a_status_request_with_more_frames_is_rejected(frames):
    assert is_status_request(frames)
    with pytest.raises(RemoteProtocolError) as info:
        check_status_request(frames)
    assert info.value.rule == RULE_STATUS_REQUEST


def test_a_status_reply_round_trips():
    figures = {"state": "ACTIVE", "sequence": 7, "lineage": None, "x": [1]}
    frames = encode_status_reply(figures)
    assert frames[0] == b"STATUS"
    assert decode_status_reply(frames) == figures


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"STATUS"],
        [b"KTHXBAI", b"{}"],
        [b"STATUS", b"{", b""],
        [b"STATUS", b"not json"],
        [b"STATUS", b"\xff"],
        [b"STATUS", b"[1, 2]"],
    ],
)
def test_a_bad_status_reply_is_rejected(frames):
    with pytest.raises(RemoteProtocolError) as info:
        decode_status_reply(frames)
    assert info.value.rule == RULE_STATUS_REPLY


def test_durations_count_at_or_under_each_bound():
    d = Durations((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 2.0, -1.0):
        d.observe(seconds)
    assert d.cumulative() == [(0.1, 3), (1.0, 4), (math.inf, 5)]
    assert d.count == 5
    assert d.sum == pytest.approx(2.65)
    with pytest.raises(ValueError):
        Durations((1.0, 0.5))


# -- trioclone status: what it prints and its exit codes ------------------------

A = Endpoints.parse("tcp://127.0.0.1:5556")
B = Endpoints.parse("tcp://127.0.0.1:5566")


def answered(server, state, **more):
    status = {
        "name": "primary" if server is A else "backup",
        "pair": True,
        "state": state,
        "synced": True,
        "sequence": 12,
        "keys": 3,
        "lineage": "abc",
        "pending": 0,
        "peer_heartbeat_age": 0.25,
        "snapshot_transfers": 0,
        "uptime": 3725.0,
        "version": "0.1.0",
        **more,
    }
    return ServerStatus(server, status)


def unreachable(server):
    return ServerStatus(server, error="no answer within 2 s")


@pytest.mark.parametrize(
    ("results", "plain", "check"),
    [
        ([answered(A, "ACTIVE"), answered(B, "PASSIVE")], 0, 0),
        ([answered(A, "ACTIVE"), unreachable(B)], 0, 0),
        ([answered(A, "PASSIVE"), answered(B, "PASSIVE")], 0, 1),
        ([answered(A, "ACTIVE"), answered(B, "ACTIVE")], 0, 1),
        ([answered(A, "PRIMARY"), unreachable(B)], 0, 1),
        ([unreachable(A), unreachable(B)], 3, 3),
    ],
)
def test_status_exit_codes(results, plain, check):
    assert exit_code(results, check=False) == plain
    assert exit_code(results, check=True) == check


def test_the_table_has_a_row_per_server_and_says_which_is_unreachable():
    table = render_table([answered(A, "ACTIVE"), unreachable(B)]).splitlines()
    assert len(table) == 3
    assert table[0].split()[:3] == ["SERVER", "NAME", "STATE"]
    row = table[1].split()
    assert row[:4] == ["tcp://127.0.0.1:5556", "primary", "ACTIVE", "yes"]
    assert "0.2s" in row or "0.3s" in row  # the peer heartbeat age
    assert "1h02m" in row  # the uptime
    assert table[2].split()[0] == "tcp://127.0.0.1:5566"
    assert "unreachable: no answer within 2 s" in table[2]
    # A standalone server has no peer.
    alone = render_table([answered(A, "ACTIVE", pair=False, peer_heartbeat_age=None)])
    assert "standalone" in alone.splitlines()[1].split()


def test_json_output_lists_every_server_and_counts_the_actives():
    out = json.loads(render_json([answered(A, "ACTIVE"), unreachable(B)]))
    assert out["actives"] == 1
    first, second = out["servers"]
    assert first["server"] == "tcp://127.0.0.1:5556" and first["reachable"]
    assert first["state"] == "ACTIVE" and first["sequence"] == 12
    assert second == {
        "server": "tcp://127.0.0.1:5566",
        "reachable": False,
        "error": "no answer within 2 s",
    }
