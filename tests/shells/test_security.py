"""CURVE, the ZAP handler and permissions, over tcp on 127.0.0.1.

inproc has no security handshake, so these tests use tcp and the real
clock; every wait is bounded by ``trio.fail_after``, and what must not
happen is checked after a wait that a working server would fill many times
over (a few HUGZ intervals of 0.1 s).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import zmq
from zmq.utils import z85

import trioclone.aio
from tests.integration.procs import free_base_ports, free_ports
from trioclone import Curve, KeyPair, PermissionDeniedError, connect, open_client
from trioclone.core.chp import HISTORY, HUGZ, SEQUENCE
from trioclone.core.permissions import PAIR
from trioclone.curve import read_key_pair, read_public, write_key_pair
from trioclone.errors import ConfigError
from trioclone.server.clone import CloneServer
from trioclone.server.settings import ServerSettings, pair_settings
from trioclone.server.zap import ZapHandler, user_id

GUARD = 20.0
QUIET = 0.5  # real seconds in which a working server answers many times over


@dataclass
class Keys:
    folder: Path
    clients: Path
    server: Path  # the pair's secret certificate
    server_public: Path

    def client(self, name: str, *, allowed: bool = True) -> Curve:
        """A client key pair NAME (its public certificate put in the
        clients folder if ``allowed``), as a client's options."""
        write_key_pair(self.folder, name)
        if allowed:
            shutil.copy(self.folder / f"{name}.key", self.clients / f"{name}.key")
        return Curve.client_files(
            self.server_public, self.folder / f"{name}.key_secret"
        )


def make_keys(folder: Path) -> Keys:
    """The pair's key pair, and an empty clients folder, in ``folder``."""
    clients = folder / "clients"
    clients.mkdir()
    write_key_pair(folder, "server")
    return Keys(folder, clients, folder / "server.key_secret", folder / "server.key")


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


def secured(
    keys: Keys, permissions: str | None = None, **options: object
) -> ServerSettings:
    if permissions is not None:
        path = keys.folder / "permissions.toml"
        path.write_text(permissions)
        options["permissions"] = str(path)
    (port,) = free_base_ports()
    options.setdefault("hugz_interval", 0.1)
    return pair_settings(
        "standalone",
        port=port,
        bind_host="127.0.0.1",
        data_dir=None,
        curve_secret=str(keys.server),
        curve_clients=str(keys.clients),
        **options,
    )


@asynccontextmanager
async def serving(settings: ServerSettings) -> AsyncIterator[CloneServer]:
    server = CloneServer(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


def address(settings: ServerSettings) -> str:
    return str(settings.bind)


async def test_an_allowed_client_reads_and_writes(keys: Keys) -> None:
    settings = secured(keys)
    alice = keys.client("alice")
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=alice) as clone,
        ):
            await clone.wait_synced()
            sequence = await clone.set("config/a", "1")
            assert server.core.store.get(b"config/a") is not None
            assert clone.get("config/a") == b"1"
            assert sequence == server.core.sequence
            assert server.core.stats["auth_denied"] == 0


@pytest.mark.parametrize("who", ["stranger", "plain"])
async def test_a_client_without_an_allowed_key_gets_nothing(
    keys: Keys, who: str
) -> None:
    """No snapshot, no updates, no write applied: for a key the server does
    not know, and for a client without CURVE."""
    settings = secured(keys)
    alice = keys.client("alice")
    outsider = keys.client("mallory", allowed=False) if who == "stranger" else None
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=alice) as insider,
            open_client([address(settings)], curve=outsider) as clone,
        ):
            await insider.wait_synced()
            clone.set_nowait("config/intruder", "x")
            await insider.set("config/a", "seen by insiders only")
            with trio.move_on_after(QUIET):
                await clone.wait_synced()
            assert not clone.synced
            assert clone.get("config/a") is None
            assert server.core.store.get(b"config/intruder") is None
            if who == "stranger":
                assert server.core.stats["auth_denied"] >= 1


async def test_a_write_outside_the_granted_prefixes_fails_at_once(keys: Keys) -> None:
    settings = secured(
        keys,
        """
        [clients.deploy]
        write = ["config/"]
        """,
    )
    deploy = keys.client("deploy")
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=deploy) as clone,
        ):
            await clone.wait_synced()
            await clone.set("config/x", "1")
            before = server.core.sequence
            started = trio.current_time()
            with pytest.raises(PermissionDeniedError, match="may not write 'secret/x'"):
                await clone.set("secret/x", "1", timeout=10)
            assert trio.current_time() - started < 2  # not a timeout
            with pytest.raises(PermissionDeniedError):
                await clone.delete("other")
            assert server.core.sequence == before
            assert server.core.store.get(b"secret/x") is None
            assert server.core.stats["writes_denied"] == 2
            await clone.set("config/y", "2")  # still a working client


async def test_an_unnamed_client_reads_everything_and_writes_nothing(
    keys: Keys,
) -> None:
    settings = secured(keys, '[clients.deploy]\nwrite = [""]\n')
    keys.client("deploy")
    viewer = keys.client("viewer")
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=viewer) as clone,
        ):
            await clone.wait_synced()
            with pytest.raises(PermissionDeniedError, match="may write no key"):
                await clone.set("a", "1")
            assert len(server.core.store) == 0


async def test_a_snapshot_outside_the_readable_prefixes_is_refused(
    keys: Keys,
) -> None:
    settings = secured(
        keys,
        """
        [default]
        read = ["public/"]
        write = ["public/"]
        """,
    )
    guest = keys.client("guest")
    with trio.fail_after(GUARD):
        async with serving(settings) as server:
            async with open_client([address(settings)], curve=guest) as clone:
                with pytest.raises(PermissionDeniedError, match="the whole map"):
                    await clone.wait_synced()
            assert server.core.stats["reads_denied"] >= 1
            async with open_client(
                [address(settings)], "public/", curve=guest
            ) as clone:
                await clone.wait_synced()
                await clone.set("public/a", "1")
                assert clone.get("public/a") == b"1"


async def test_a_key_added_to_the_folder_is_allowed_without_a_restart(
    keys: Keys,
) -> None:
    settings = secured(keys)
    late = keys.client("late", allowed=False)
    with trio.fail_after(GUARD):
        async with serving(settings):
            async with open_client([address(settings)], curve=late) as clone:
                with trio.move_on_after(QUIET):
                    await clone.wait_synced()
                assert not clone.synced
            shutil.copy(keys.folder / "late.key", keys.clients / "late.key")
            async with open_client([address(settings)], curve=late) as clone:
                await clone.wait_synced()
                await clone.set("k", "v")


def secured_pair(
    keys: Keys, primary_permissions: Path, backup_permissions: Path
) -> tuple[ServerSettings, ServerSettings]:
    """A secured pair on 127.0.0.1 with fast heartbeats, each server with
    its own permissions file."""
    primary_port, backup_port = free_base_ports(2)
    primary_state, backup_state = free_ports(2)

    def side(role: str) -> ServerSettings:
        mine = role == "primary"
        return pair_settings(
            role,
            port=primary_port if mine else backup_port,
            peer_port=backup_port if mine else primary_port,
            state_port=primary_state if mine else backup_state,
            peer_state_port=backup_state if mine else primary_state,
            bind_host="127.0.0.1",
            peer_host="127.0.0.1",
            heartbeat=0.1,
            hugz_interval=0.1,
            data_dir=None,
            curve_secret=str(keys.server),
            curve_clients=str(keys.clients),
            permissions=str(primary_permissions if mine else backup_permissions),
        )

    return side("primary"), side("backup")


async def refused_then_failed_over(
    keys: Keys,
    pair: tuple[ServerSettings, ServerSettings],
    before_takeover: Callable[[CloneServer], None] = lambda passive: None,
) -> CloneServer:
    """Client "deploy" writes config/a, is refused secret/b, and once the
    passive holds config/a (``before_takeover(passive)`` then) the active
    dies and the passive takes over; the passive, once it applied a write
    of the client's since."""
    primary, backup = pair
    deploy = keys.client("deploy")
    servers = [address(primary), address(backup)]
    async with serving(backup) as passive, trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run_primary() -> None:
            with scope:
                await CloneServer(primary).run()

        nursery.start_soon(run_primary)
        async with open_client(servers, curve=deploy) as clone:
            await clone.wait_synced()
            await clone.set("config/a", "1")
            with pytest.raises(PermissionDeniedError):
                await clone.set("secret/b", "2")
            await passive.synced.wait_value(True)
            while passive.core.store.get(b"config/a") is None:
                await trio.sleep(0.01)
            before_takeover(passive)
            scope.cancel()  # the active dies: the passive takes over
            await clone.set("config/c", "3", timeout=10)
            assert clone.server == servers[1]
        nursery.cancel_scope.cancel()
    return passive


async def test_a_secured_pair_syncs_and_fails_over_with_its_shared_key(
    keys: Keys,
) -> None:
    """The pair's heartbeat, sync and relay links use the pair's key; a
    write the passive saw refused never comes back at a takeover."""
    permissions = keys.folder / "permissions.toml"
    permissions.write_text('[clients.deploy]\nwrite = ["config/"]\n')
    with trio.fail_after(GUARD):
        passive = await refused_then_failed_over(
            keys, secured_pair(keys, permissions, permissions)
        )
    assert passive.core.stats["writes_denied"] == 1
    assert passive.core.store.get(b"secret/b") is None
    assert passive.core.store.get(b"config/a") is not None


def test_key_files_round_trip_and_the_secret_is_private(tmp_path: Path) -> None:
    pair = write_key_pair(tmp_path, "alice")
    secret = tmp_path / "alice.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert read_key_pair(secret) == pair
    assert read_public(tmp_path / "alice.key") == pair.public
    assert read_public(secret) == pair.public
    with pytest.raises(ConfigError, match="never overwritten"):
        write_key_pair(tmp_path, "alice")
    with pytest.raises(ConfigError, match="no secret key"):
        read_key_pair(tmp_path / "alice.key")
    with pytest.raises(ConfigError, match="plain, printable UTF-8 file name"):
        write_key_pair(tmp_path, "../x")


@pytest.mark.parametrize(
    "text, problem",
    [
        ('curve\n    public-key = "short"\n', "not a CURVE key"),
        ("metadata\n", "no public-key"),
        ("", "no public-key"),
    ],
)
def test_a_bad_certificate_is_refused_naming_the_file(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "bad.key"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as caught:
        read_public(path)
    assert str(path) in str(caught.value)


def test_a_secret_whose_halves_do_not_match_is_refused(tmp_path: Path) -> None:
    one, other = KeyPair.new(), KeyPair.new()
    write_key_pair(tmp_path, "odd", KeyPair(one.public, other.secret))
    with pytest.raises(ConfigError, match="not its secret key's"):
        read_key_pair(tmp_path / "odd.key_secret")


def test_a_server_with_a_bad_key_does_not_start(keys: Keys) -> None:
    settings = secured(keys)
    (keys.clients / "broken.key").write_text('curve\n public-key = "x"\n')
    with pytest.raises(ConfigError, match=r"broken\.key"):
        CloneServer(settings)


async def test_the_stream_carries_only_what_a_client_may_read(keys: Keys) -> None:
    """A client that subscribes beyond its readable prefixes (here to the
    whole map, with a bare SUB) gets none of those updates."""
    settings = secured(
        keys,
        """
        [clients.deploy]
        write = [""]
        [default]
        read = ["public/"]
        """,
    )
    deploy = keys.client("deploy")
    guest = keys.client("guest")
    assert guest.server is None
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=deploy) as writer,
            open_client([address(settings)], "public/", curve=guest) as reader,
        ):
            context = zmq.Context()
            sub = context.socket(zmq.SUB)
            try:
                for option, value in guest.options(binds=False):
                    sub.setsockopt(option, value)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.setsockopt(zmq.SUBSCRIBE, b"secret/")
                sub.setsockopt(zmq.SUBSCRIBE, HUGZ)  # every client may: a clock
                sub.connect(settings.bind.publisher)
                await reader.wait_synced()
                await writer.wait_synced()
                while server.core.stats["reads_denied"] < 2:  # both refused
                    await trio.sleep(0.01)
                while not sub.poll(0):  # its HUGZ subscription is in
                    await trio.sleep(0.01)
                while sub.poll(0):
                    sub.recv_multipart()
                await writer.set("secret/x", "hidden")
                last = await writer.set("public/x", "shown")
                # A HUGZ carries the sequence when it was sent: one at or
                # past the writes' comes after them on the SUB's one
                # connection, so all it got of them is in by then.
                seen: list[bytes] = []
                while True:
                    while not sub.poll(0):
                        await trio.sleep(0.01)
                    frames = sub.recv_multipart()
                    seen.append(frames[0])
                    if frames[0] == HUGZ and SEQUENCE.unpack(frames[1])[0] >= last:
                        break
                assert set(seen) == {HUGZ}
                assert server.core.stats["reads_denied"] >= 2
                assert reader.get("secret/x") is None
            finally:
                sub.close(0)
                context.term()


async def test_only_the_pairs_key_may_hand_over_writes(keys: Keys) -> None:
    """A client that may write everything still cannot pose as the peer:
    a KVSET with a sequence and a lineage (a hand-over, or a window
    hand-over under the reserved history key) is refused, not applied."""
    settings = secured(keys)
    alice = keys.client("alice")
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=alice) as clone,
        ):
            await clone.wait_synced()
            lineage = server.core.lineage.encode()
            forged = [
                [
                    b"k",
                    SEQUENCE.pack(7),
                    b"u" * 16,
                    b"lineage=" + lineage + b"\n",
                    b"v",
                ],
                [
                    HISTORY,
                    SEQUENCE.pack(7),
                    b"",
                    b"age=0\nlineage=" + lineage + b"\n",
                    b"w" * 16,
                ],
            ]
            context = zmq.Context()
            pub = context.socket(zmq.PUB)
            try:
                for option, value in alice.options(binds=False):
                    pub.setsockopt(option, value)
                pub.connect(settings.bind.collector)
                while server.core.stats["writes_denied"] < 2:
                    for frames in forged:
                        pub.send_multipart(frames)
                    await trio.sleep(0.05)
            finally:
                pub.close(0)
                context.term()
            assert server.core.store.get(b"k") is None
            assert server.core.stats["handoff_received"] == 0
            assert b"w" * 16 not in server.core.applied
            await clone.set("k", "still a working client")


async def test_permissions_and_removed_keys_apply_while_serving(keys: Keys) -> None:
    settings = secured(keys, '[clients.deploy]\nwrite = ["config/"]\n')
    assert settings.permissions is not None
    deploy = keys.client("deploy")
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=deploy) as clone,
        ):
            await clone.wait_synced()
            with pytest.raises(PermissionDeniedError):
                await clone.set("services/a", "1")
            Path(settings.permissions).write_text(
                '[clients.deploy]\nwrite = ["config/", "services/"]\n'
            )
            assert server.zap is not None  # (looked at once a second: below)
            server.zap.reload(trio.current_time(), at_once=True)
            await clone.set("services/a", "1")
            (keys.clients / "deploy.key").unlink()
            server.zap.reload(trio.current_time(), at_once=True)
            with pytest.raises(PermissionDeniedError, match="may write no key"):
                await clone.set("config/a", "1")


async def test_the_blocking_client_takes_keys(keys: Keys) -> None:
    settings = secured(keys)
    alice = keys.client("alice")

    def use() -> bytes | None:
        with connect([address(settings)], curve=alice, sync_timeout=10) as clone:
            clone.set("k", "v")
            return clone.get("k")

    with trio.fail_after(GUARD):
        async with serving(settings):
            assert await trio.to_thread.run_sync(use) == b"v"


async def test_the_asyncio_client_takes_keys_and_gets_refusals_as_raised(
    keys: Keys,
) -> None:
    """A refused write and a refused snapshot reach the asyncio program as
    ``PermissionDeniedError``; a refused ``connect`` leaves no agent running."""
    settings = secured(
        keys,
        """
        [default]
        read = ["public/"]
        write = ["public/mine/"]
        """,
    )
    guest = keys.client("guest")
    servers = [address(settings)]

    async def use() -> bytes | None:
        with pytest.raises(PermissionDeniedError, match="the whole map"):
            async with trioclone.aio.connect(servers, curve=guest):
                raise AssertionError("not reached")
        async with trioclone.aio.connect(servers, "public/", curve=guest) as clone:
            with pytest.raises(PermissionDeniedError, match="may not write"):
                await clone.set("public/theirs", "1")
            await clone.set("public/mine/a", "1")
            return clone.get("public/mine/a")

    def agents() -> int:
        return sum(t.name == "trioclone-agent" for t in threading.enumerate())

    with trio.fail_after(GUARD):
        async with serving(settings):
            before = agents()
            got = await trio.to_thread.run_sync(asyncio.run, use())
            assert got == b"1"
            assert agents() == before


def test_the_zap_handler_looks_at_the_folder_once_a_second(keys: Keys) -> None:
    alice = keys.client("alice")
    zap = ZapHandler(read_key_pair(keys.server), keys.clients, None, Counter())
    user = user_id("alice", z85.decode(alice.client.public))
    assert zap.grant(user).may_write(b"k")
    assert not zap.grant("alice").may_write(b"k")  # a User-Id names the key too
    zap.reload(100.0)  # the first look
    (keys.clients / "alice.key").unlink()
    zap.reload(100.5)
    assert zap.grant(user).may_write(b"k")  # not looked at yet
    zap.reload(101.0)
    assert not zap.grant(user).may_write(b"k")
    assert not zap.grant(user).may_read(b"")
    assert zap.grant(PAIR).may_write(b"k")
    (keys.clients / "bad.key").write_text("not a certificate")
    shutil.copy(keys.folder / "alice.key", keys.clients / "alice.key")
    zap.reload(102.0)  # the bad file is left out; the others are read
    assert zap.grant(user).may_write(b"k")
    assert sorted(zap.allowed.values()) == ["alice"]
    assert alice.client.public in {z85.encode(k) for k in zap.allowed}
