"""Tests for the CHP wire codec (trioclone.core.chp)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from trioclone.core.chp import (
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    KVMsg,
    check_history,
    decode_history,
    decode_kvmsg,
    decode_properties,
    decode_request,
    encode_kvmsg,
    encode_properties,
    encode_request,
    format_ttl,
    history_batch,
    hugz,
    is_reserved,
    kthxbai,
    ttl_seconds,
    with_ttl,
)
from trioclone.errors import LocalProtocolError, RemoteProtocolError

VECTORS = json.loads((Path(__file__).parent.parent / "vectors.json").read_text())
UUID = bytes(range(16))


def _frames(vector: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(frame) for frame in vector["frames"]]


def _is_request_vector(vector: dict[str, Any]) -> bool:
    rule = vector["rule"]
    return "ICANHAZ" in rule or "snapshot command" in rule


# --------------------------------------------------------------------------
# Wire vectors
# --------------------------------------------------------------------------


def test_vectors_file_is_not_empty() -> None:
    assert len(VECTORS["valid"]) >= 10
    assert len(VECTORS["invalid"]) >= 10


@pytest.mark.parametrize(
    "vector", VECTORS["valid"], ids=[v["name"] for v in VECTORS["valid"]]
)
def test_valid_vector(vector: dict[str, Any]) -> None:
    frames = _frames(vector)
    expect = vector["expect"]
    if expect.get("command") == "ICANHAZ":
        assert decode_request(frames) == expect["subtree"].encode()
        return
    msg = decode_kvmsg(frames)
    assert isinstance(msg, KVMsg)
    checked = 0
    if "key" in expect:
        assert msg.key == expect["key"].encode()
        checked += 1
    if "sequence" in expect:
        assert msg.sequence == expect["sequence"]
        checked += 1
    if "uuid" in expect:
        assert msg.uuid == bytes.fromhex(expect["uuid"])
        checked += 1
    if "properties" in expect:
        assert dict(msg.properties) == expect["properties"]
        checked += 1
    if "body" in expect:
        assert msg.body == expect["body"].encode()
        checked += 1
    if "body_hex" in expect:
        assert msg.body == bytes.fromhex(expect["body_hex"])
        checked += 1
    if "ttl_seconds" in expect:
        assert msg.ttl == expect["ttl_seconds"]
        checked += 1
    else:
        assert msg.ttl is None
    if "delete" in expect:
        assert (not msg.body) is expect["delete"]
        checked += 1
    assert checked >= 3, "vector checks too little"


@pytest.mark.parametrize(
    "vector", VECTORS["invalid"], ids=[v["name"] for v in VECTORS["invalid"]]
)
def test_invalid_vector(vector: dict[str, Any]) -> None:
    frames = _frames(vector)
    decode = decode_request if _is_request_vector(vector) else decode_kvmsg
    with pytest.raises(RemoteProtocolError) as info:
        decode(frames)
    assert info.value.rule == vector["rule"]
    assert str(info.value).startswith(vector["rule"])


# --------------------------------------------------------------------------
# Round trip and robustness
# --------------------------------------------------------------------------

_prop_names = st.text(min_size=1, max_size=12).filter(
    lambda s: "=" not in s and "\n" not in s and s != "ttl"
)
_prop_values = st.text(max_size=24).filter(lambda s: "\n" not in s)
_ttl_values = st.one_of(
    st.integers(min_value=0, max_value=10**9).map(str),
    st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False).map(
        format_ttl
    ),
    st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False).map(
        repr
    ),
)


@st.composite
def _properties(draw: st.DrawFn) -> dict[str, str]:
    props = draw(st.dictionaries(_prop_names, _prop_values, max_size=6))
    if draw(st.booleans()):
        props["ttl"] = draw(_ttl_values)
    return props


kvmsgs = st.builds(
    KVMsg,
    key=st.binary(min_size=1, max_size=64),
    sequence=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    uuid=st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)),
    properties=_properties(),
    body=st.binary(max_size=256),
)


@given(kvmsgs)
def test_kvmsg_round_trip(msg: KVMsg) -> None:
    frames = encode_kvmsg(msg)
    assert len(frames) == 5
    assert all(isinstance(frame, bytes) for frame in frames)
    decoded = decode_kvmsg(frames)
    assert decoded.key == msg.key
    assert decoded.sequence == msg.sequence
    assert decoded.uuid == msg.uuid
    assert dict(decoded.properties) == dict(msg.properties)
    assert decoded.body == msg.body
    assert decoded.ttl == msg.ttl


@given(kvmsgs)
def test_encode_is_stable_after_round_trip(msg: KVMsg) -> None:
    frames = encode_kvmsg(msg)
    assert encode_kvmsg(decode_kvmsg(frames)) == frames


_arbitrary_frames = st.lists(st.binary(max_size=40), max_size=7)


_PROPERTY_PIECES = [b"ttl=", b"ttl", b"=", b"\n", b"5", b"nan", b"-", b"inf", b"\xff"]
_PROPERTY_PIECES += [b"1e999", b"a=b", b"\xc3", b"0", b"_1", b"\r"]


def _frame_lists() -> st.SearchStrategy[list[bytes]]:
    """Arbitrary frames, plus near-valid ones that reach the deeper checks."""
    interesting_props = st.one_of(
        st.binary(max_size=40),
        st.lists(
            st.sampled_from(_PROPERTY_PIECES),
            max_size=8,
        ).map(b"".join),
    )
    near_valid = st.tuples(
        st.binary(max_size=8),
        st.one_of(st.binary(min_size=8, max_size=8), st.binary(max_size=10)),
        st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary()),
        interesting_props,
        st.binary(max_size=8),
    ).map(list)
    near_request = st.lists(st.binary(max_size=10), max_size=3).map(
        lambda rest: [ICANHAZ, *rest]
    )
    return st.one_of(_arbitrary_frames, near_valid, near_request)


@settings(max_examples=500)
@given(_frame_lists())
def test_decode_kvmsg_never_crashes(frames: list[bytes]) -> None:
    try:
        msg = decode_kvmsg(frames)
    except RemoteProtocolError as exc:
        assert exc.rule
    else:
        assert isinstance(msg, KVMsg)
        assert len(frames) == 5
        # Whatever is accepted can be sent on unchanged.
        assert decode_kvmsg(encode_kvmsg(msg)) == msg


@settings(max_examples=500)
@given(_frame_lists())
def test_decode_request_never_crashes(frames: list[bytes]) -> None:
    try:
        subtree = decode_request(frames)
    except RemoteProtocolError as exc:
        assert exc.rule
    else:
        assert frames == [ICANHAZ, subtree]


# --------------------------------------------------------------------------
# Encoder rejections
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        KVMsg(b"", 1, UUID, {}, b"v"),
        KVMsg(b"k", 1, bytes(15), {}, b"v"),
        KVMsg(b"k", 1, bytes(17), {}, b"v"),
        KVMsg(b"k", 1, UUID, {"a=b": "c"}, b"v"),
        KVMsg(b"k", 1, UUID, {"a": "b\nc"}, b"v"),
        KVMsg(b"k", 1, UUID, {"a\nb": "c"}, b"v"),
        KVMsg(b"k", 1, UUID, {"": "c"}, b"v"),
        KVMsg(b"k", 2**63, UUID, {}, b"v"),
        KVMsg(b"k", -(2**63) - 1, UUID, {}, b"v"),
    ],
    ids=[
        "empty-key",
        "uuid-15",
        "uuid-17",
        "equals-in-name",
        "newline-in-value",
        "newline-in-name",
        "empty-name",
        "sequence-too-big",
        "sequence-too-small",
    ],
)
def test_encode_kvmsg_rejects(msg: KVMsg) -> None:
    with pytest.raises(LocalProtocolError):
        encode_kvmsg(msg)


def test_encode_kvmsg_rejects_unencodable_property() -> None:
    with pytest.raises(LocalProtocolError):
        encode_kvmsg(KVMsg(b"k", 1, UUID, {"a": "\ud800"}, b"v"))


def test_encode_kvmsg_frames() -> None:
    msg = KVMsg(b"/a/k", 258, UUID, {"ttl": "5", "owner": "x"}, b"body")
    assert encode_kvmsg(msg) == [
        b"/a/k",
        b"\x00\x00\x00\x00\x00\x00\x01\x02",
        UUID,
        b"ttl=5\nowner=x\n",
        b"body",
    ]


def test_encode_negative_sequence_is_twos_complement() -> None:
    frames = encode_kvmsg(KVMsg(b"k", -1))
    assert frames[1] == b"\xff" * 8
    assert decode_kvmsg(frames).sequence == -1


def test_kvmsg_defaults() -> None:
    msg = KVMsg(b"k")
    assert encode_kvmsg(msg) == [b"k", bytes(8), b"", b"", b""]
    assert msg.body == b""  # a delete
    assert msg.ttl is None


# --------------------------------------------------------------------------
# Properties codec
# --------------------------------------------------------------------------


def test_property_line_splits_at_first_equals() -> None:
    assert decode_properties(b"a=b=c\n") == {"a": "b=c"}


def test_property_value_may_be_empty() -> None:
    assert decode_properties(b"a=\n") == {"a": ""}


def test_missing_final_newline_is_tolerated() -> None:
    assert decode_properties(b"a=1\nb=2") == {"a": "1", "b": "2"}
    assert decode_properties(b"a=1") == {"a": "1"}


def test_properties_keep_unicode() -> None:
    props = {"näme": "välue ☃"}
    assert decode_properties(encode_properties(props)) == props


@pytest.mark.parametrize(
    "frame",
    [b"\xff=1\n", b"a=\xc3\n", b"a=\xed\xa0\x80\n"],
    ids=["bad-name", "truncated-value", "encoded-surrogate"],
)
def test_non_utf8_properties_rejected(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_properties(frame)
    assert info.value.rule == "properties are UTF-8 text"
    with pytest.raises(RemoteProtocolError) as info:
        decode_kvmsg([b"k", bytes(8), b"", frame, b"v"])
    assert info.value.rule == "properties are UTF-8 text"


@pytest.mark.parametrize(
    "frame",
    [b"a\n", b"=v\n", b"\n", b"a=1\n\n", b"a=1\n\nb=2\n"],
    ids=["no-equals", "empty-name", "blank-line", "trailing-blank", "inner-blank"],
)
def test_bad_property_lines_rejected(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_properties(frame)
    assert info.value.rule == "a property line is name=value"


def test_empty_properties_frame() -> None:
    assert decode_properties(b"") == {}
    assert encode_properties({}) == b""
    assert dict(decode_kvmsg([b"k", bytes(8), b"", b"", b"v"]).properties) == {}


def test_ttl_zero_means_no_ttl() -> None:
    msg = decode_kvmsg([b"k", bytes(8), b"", b"ttl=0\n", b"v"])
    assert msg.properties == {"ttl": "0"}
    assert msg.ttl is None
    assert ttl_seconds({"ttl": "0.000000"}) is None


def test_ttl_decimal() -> None:
    msg = decode_kvmsg([b"k", bytes(8), b"", b"ttl=2.500000\n", b"v"])
    assert msg.ttl == 2.5


def test_ttl_absent() -> None:
    assert ttl_seconds({}) is None
    assert ttl_seconds({"other": "5"}) is None
    assert KVMsg(b"k", properties={"ttl": "7"}).ttl == 7.0


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("soon", "ttl is a number of seconds"),
        ("", "ttl is a number of seconds"),
        ("-1", "ttl is not negative"),
        ("-0.5", "ttl is not negative"),
        ("nan", "ttl is a finite number"),
        ("inf", "ttl is a finite number"),
        ("1e999", "ttl is a finite number"),
    ],
)
def test_bad_ttl_rejected(text: str, rule: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        ttl_seconds({"ttl": text})
    assert info.value.rule == rule
    frame = f"ttl={text}\n".encode()
    with pytest.raises(RemoteProtocolError) as info:
        decode_kvmsg([b"k", bytes(8), b"", frame, b"v"])
    assert info.value.rule == rule


def test_format_ttl() -> None:
    assert format_ttl(30.0) == "30"
    assert format_ttl(2.5) == "2.500000"
    assert format_ttl(0.001) == "0.001000"
    assert format_ttl(0) == "0"


@given(st.floats(min_value=0.001, max_value=1e9, allow_nan=False))
def test_format_ttl_parses_back(ttl: float) -> None:
    text = format_ttl(ttl)
    parsed = ttl_seconds({"ttl": text})
    assert parsed is not None
    assert math.isclose(parsed, ttl, abs_tol=1e-6)


def test_with_ttl() -> None:
    props = {"owner": "x"}
    assert with_ttl(props, 15.0) == {"owner": "x", "ttl": "15"}
    assert with_ttl({"ttl": "3", "owner": "x"}, None) == {"owner": "x"}
    assert with_ttl(props, None) == {"owner": "x"}
    assert props == {"owner": "x"}  # not modified in place


# --------------------------------------------------------------------------
# Snapshot request, KTHXBAI and HUGZ
# --------------------------------------------------------------------------


def test_kthxbai_frames() -> None:
    frames = kthxbai(1234, b"/client/")
    assert len(frames) == 5
    msg = decode_kvmsg(frames)
    assert msg.key == KTHXBAI == b"KTHXBAI"
    assert msg.sequence == 1234
    assert msg.body == b"/client/"
    assert msg.uuid == b""
    assert dict(msg.properties) == {}


def test_kthxbai_empty_subtree() -> None:
    msg = decode_kvmsg(kthxbai(0, b""))
    assert msg.key == KTHXBAI
    assert msg.sequence == 0
    assert msg.body == b""


def test_hugz_frames() -> None:
    frames = hugz(99)
    assert len(frames) == 5
    msg = decode_kvmsg(frames)
    assert msg.key == HUGZ == b"HUGZ"
    assert msg.sequence == 99
    assert msg.body == b""


@pytest.mark.parametrize("subtree", [b"", b"/client/", b"/a/b/c/", b"\x00\xff"])
def test_request_round_trip(subtree: bytes) -> None:
    frames = encode_request(subtree)
    assert frames == [b"ICANHAZ?", subtree]
    assert decode_request(frames) == subtree


def test_encode_request_default_is_everything() -> None:
    assert encode_request() == [ICANHAZ, b""]
    assert decode_request(encode_request()) == b""


@given(st.binary())
def test_request_round_trip_any_subtree(subtree: bytes) -> None:
    assert decode_request(encode_request(subtree)) == subtree


def test_decode_request_rejects_empty_message() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_request([])
    assert info.value.rule == "ICANHAZ has exactly 2 frames"


def test_decode_request_rejects_other_command() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_request([b"ICANHAZ", b""])
    assert info.value.rule == "the only snapshot command is ICANHAZ?"


def test_a_history_batch_round_trip() -> None:
    uuids = [bytes([n]) * 16 for n in range(3)]
    msg = decode_kvmsg(history_batch(uuids, 2.5))
    assert check_history(msg) == 2.5
    assert decode_history(msg) == (uuids, 2.5)


@pytest.mark.parametrize(
    ("body", "age"),
    [(b"x" * 15, "1"), (b"x" * 16, ""), (b"x" * 16, "nan"), (b"x" * 16, "-1")],
)
def test_a_bad_history_batch_is_refused_by_check_and_decode(
    body: bytes, age: str
) -> None:
    msg = KVMsg(b"\x00history", 0, b"", {"age": age} if age else {}, body)
    for check in (check_history, decode_history):
        with pytest.raises(RemoteProtocolError) as info:
            check(msg)
        assert info.value.rule == (
            "a history batch is whole 16-byte UUIDs with a finite age"
        )


@pytest.mark.parametrize(
    ("key", "reserved"),
    [
        (HUGZ, True),
        (KTHXBAI, True),
        (b"/a/\x00HUGZ", True),
        (b"\x00HUGZ", True),
        (b"/HUGZ", False),
        (b"HUGZ/", False),
        (b"/a/", False),
    ],
)
def test_reserved_keys_are_the_commands_and_subtree_heartbeats(
    key: bytes, reserved: bool
) -> None:
    assert is_reserved(key) is reserved
