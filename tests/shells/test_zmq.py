"""The Trio <-> pyzmq adapter (trioclone._zmq), on real pyzmq sockets.

Every test runs real sockets over ``inproc://`` in a ``zmq.Context(io_threads=0)``
under the autojump clock: inproc wake-ups are written to the socket's FD
synchronously by the peer's call, so Trio sees each of them and virtual time is
deterministic. A test that deadlocks ends at its ``trio.fail_after`` guard
(the clock jumps to it) instead of hanging.

Each test names the adapter rule (docstring of ``trioclone._zmq``) it proves.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing
import zmq

from trioclone._zmq import Frames, Socket, Sockets, UnroutableError

GUARD = 60.0  # virtual seconds; only reached if a test deadlocks


# --------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=0)
    try:
        yield ctx
    finally:
        # closes every socket still open on the context, then terminates it
        ctx.destroy(linger=0)


@pytest.fixture
async def sockets(
    context: zmq.Context[zmq.Socket[bytes]],
) -> AsyncIterator[Sockets]:
    group = Sockets(context)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> Callable[[], str]:
    counter = itertools.count()
    base = f"inproc://test-zmq/{request.node.name}"

    def make() -> str:
        return f"{base}/{next(counter)}"

    return make


def push_pull(
    sockets: Sockets, address: str, hwm: int | None = None
) -> tuple[Socket, Socket]:
    """A PULL bound at ``address`` and a PUSH connected to it."""
    pull_options: list[tuple[int, int | bytes]] = []
    push_options: list[tuple[int, int | bytes]] = []
    if hwm is not None:
        pull_options.append((zmq.RCVHWM, hwm))
        push_options.append((zmq.SNDHWM, hwm))
    pull = sockets.open(zmq.PULL, bind=[address], options=pull_options)
    push = sockets.open(zmq.PUSH, connect=[address], options=push_options)
    return push, pull


def drain_now(sock: Socket) -> list[Frames]:
    """Every message queued on ``sock`` right now, without waiting."""
    out: list[Frames] = []
    while True:
        try:
            out.append(sock.raw.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return out


def events(sock: Socket) -> int:
    """The socket's ``EVENTS`` (reading it consumes the FD's notification)."""
    return int(sock.raw.get(zmq.EVENTS))


def receiver_of(sock: Socket, method: str) -> Callable[[], Awaitable[list[Frames]]]:
    """``receive`` or ``receive_batch``, both returning a list of messages."""
    if method == "receive":

        async def one() -> list[Frames]:
            return [await sock.receive()]

        return one
    return sock.receive_batch


class BeforeNextStep(trio.abc.Instrument):
    """Call ``action`` once, right before ``task`` next runs.

    Used when the task is parked on its FD and the FD was just made readable:
    the task has then already been rescheduled, so whatever ``action`` does
    (cancel, close) lands between the wake-up and the task running. This
    makes those races deterministic.
    """

    def __init__(self, task: trio.lowlevel.Task, action: Callable[[], None]) -> None:
        self.task = task
        self.action = action
        self.fired = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task and not self.fired:
            self.fired = True
            self.action()


def fill_dealer(sockets: Sockets, address: str) -> tuple[Socket, Socket, int]:
    """A ROUTER that does not read and a DEALER sent to until it is full."""
    router = sockets.open(zmq.ROUTER, bind=[address], options=[(zmq.RCVHWM, 2)])
    dealer = sockets.open(
        zmq.DEALER,
        connect=[address],
        options=[(zmq.SNDHWM, 2), (zmq.IDENTITY, b"dealer")],
    )
    sent = 0
    while dealer.try_send([b"%d" % sent]):
        sent += 1
        assert sent < 1000, "try_send never reported a full queue"
    return router, dealer, sent


RECEIVE_METHODS = pytest.mark.parametrize("method", ["receive", "receive_batch"])


# --------------------------------------------------------------------------
# rule 4: a message taken off the socket is always returned (cancellation)
# --------------------------------------------------------------------------


@RECEIVE_METHODS
async def test_cancelled_waiting_receive_loses_nothing(
    autojump_clock: trio.abc.Clock,
    sockets: Sockets,
    endpoint: Callable[[], str],
    method: str,
) -> None:
    push, pull = push_pull(sockets, endpoint())
    receive = receiver_of(pull, method)
    got: list[Frames] = []
    scope = trio.CancelScope()

    async def waiter(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            task_status.started()
            got.extend(await receive())

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            await nursery.start(waiter)
            await trio.testing.wait_all_tasks_blocked()  # parked on the FD
            scope.cancel()
        assert scope.cancelled_caught
        assert got == []

        await push.send([b"first"])
        await push.send([b"second"])
        if method == "receive":
            assert await pull.receive() == [b"first"]
            assert await pull.receive() == [b"second"]
        else:
            assert await pull.receive_batch(1) == [[b"first"]]
            assert await pull.receive_batch() == [[b"second"]]
    assert drain_now(pull) == []


@RECEIVE_METHODS
async def test_receive_woken_then_cancelled_returns_what_it_took(
    autojump_clock: trio.abc.Clock,
    sockets: Sockets,
    endpoint: Callable[[], str],
    method: str,
) -> None:
    """A receiver woken by a message and cancelled before it runs either
    returns the message or leaves it queued; it never swallows it."""
    push, pull = push_pull(sockets, endpoint())
    receive = receiver_of(pull, method)
    got: list[Frames] = []
    scope = trio.CancelScope()

    async def waiter(task_status: trio.TaskStatus[trio.lowlevel.Task]) -> None:
        with scope:
            task_status.started(trio.lowlevel.current_task())
            got.extend(await receive())
            await trio.sleep_forever()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            task = await nursery.start(waiter)
            await trio.testing.wait_all_tasks_blocked()  # parked on the FD
            instrument = BeforeNextStep(task, scope.cancel)
            trio.lowlevel.add_instrument(instrument)
            push.raw.send_multipart([b"first"], zmq.NOBLOCK)  # wakes the waiter
            # leaving the nursery waits for the (cancelled) waiter to exit
        trio.lowlevel.remove_instrument(instrument)
        assert instrument.fired
        assert scope.cancelled_caught

        await push.send([b"second"])
    assert got + drain_now(pull) == [[b"first"], [b"second"]]
    # and with this adapter the woken receive kept what it took
    assert got == [[b"first"]]


@RECEIVE_METHODS
async def test_already_cancelled_receive_takes_nothing(
    autojump_clock: trio.abc.Clock,
    sockets: Sockets,
    endpoint: Callable[[], str],
    method: str,
) -> None:
    push, pull = push_pull(sockets, endpoint())
    receive = receiver_of(pull, method)
    with trio.fail_after(GUARD):
        await push.send([b"queued", b"two frames"])
        assert events(pull) & zmq.POLLIN  # really receivable

        reached = False
        with trio.CancelScope() as scope:
            scope.cancel()
            await receive()
            reached = True
        assert scope.cancelled_caught
        assert not reached

        assert await receive() == [[b"queued", b"two frames"]]
    assert drain_now(pull) == []


async def test_cancelled_send_sends_nothing(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    push, pull = push_pull(sockets, endpoint())
    with trio.fail_after(GUARD):
        with trio.CancelScope() as scope:
            scope.cancel()
            await push.send([b"never"])
        assert scope.cancelled_caught
        await push.send([b"sent"])
        assert await pull.receive() == [b"sent"]
    assert drain_now(pull) == []


async def test_send_cancelled_while_waiting_for_room_sends_nothing(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    address = endpoint()
    router = sockets.open(zmq.ROUTER, bind=[address], options=[(zmq.RCVHWM, 5)])
    dealer = sockets.open(
        zmq.DEALER,
        connect=[address],
        options=[(zmq.SNDHWM, 5), (zmq.IDENTITY, b"dealer")],
    )
    sent: list[int] = []
    with trio.fail_after(GUARD):
        with trio.move_on_after(1) as scope:
            for i in range(1000):
                await dealer.send([b"%d" % i])
                sent.append(i)
        assert scope.cancelled_caught  # it was waiting for room when cancelled
        assert len(sent) < 1000
        assert sent == list(range(len(sent)))
        received: list[Frames] = []
        while len(received) < len(sent):
            received.extend(await router.receive_batch())
    assert received + drain_now(router) == [[b"dealer", b"%d" % i] for i in sent]


# --------------------------------------------------------------------------
# rule 7: close wakes waiters with ClosedResourceError
# --------------------------------------------------------------------------


@RECEIVE_METHODS
async def test_close_wakes_receiver_with_closed_resource_error(
    autojump_clock: trio.abc.Clock,
    sockets: Sockets,
    endpoint: Callable[[], str],
    method: str,
) -> None:
    _push, pull = push_pull(sockets, endpoint())
    receive = receiver_of(pull, method)
    outcome: list[str] = []

    async def waiter() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await receive()
        outcome.append("closed")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()  # parked on the FD
            assert outcome == []
            pull.close()
    assert outcome == ["closed"]
    assert pull.closed
    assert pull.raw.closed


@RECEIVE_METHODS
async def test_close_between_wake_up_and_run_raises_closed_resource_error(
    autojump_clock: trio.abc.Clock,
    sockets: Sockets,
    endpoint: Callable[[], str],
    method: str,
) -> None:
    push, pull = push_pull(sockets, endpoint())
    receive = receiver_of(pull, method)
    outcome: list[object] = []

    async def waiter(task_status: trio.TaskStatus[trio.lowlevel.Task]) -> None:
        task_status.started(trio.lowlevel.current_task())
        try:
            outcome.append(await receive())
        except trio.ClosedResourceError:
            outcome.append("closed")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            task = await nursery.start(waiter)
            await trio.testing.wait_all_tasks_blocked()  # parked on the FD
            instrument = BeforeNextStep(task, pull.close)
            trio.lowlevel.add_instrument(instrument)
            push.raw.send_multipart([b"wake"], zmq.NOBLOCK)
        trio.lowlevel.remove_instrument(instrument)
    assert instrument.fired
    assert outcome == ["closed"]


async def test_close_wakes_blocked_sender_with_closed_resource_error(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    address = endpoint()
    sockets.open(zmq.ROUTER, bind=[address], options=[(zmq.RCVHWM, 2)])
    dealer = sockets.open(zmq.DEALER, connect=[address], options=[(zmq.SNDHWM, 2)])
    outcome: list[str] = []

    async def flood() -> None:
        try:
            for _ in range(1000):
                await dealer.send([b"x"])
        except trio.ClosedResourceError:
            outcome.append("closed")
        else:
            outcome.append("all sent")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()  # queue full, waiting
            assert outcome == []
            dealer.close()
    assert outcome == ["closed"]


async def test_every_call_after_close_raises_closed_resource_error(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    push, pull = push_pull(sockets, endpoint())
    await push.send([b"left behind"])
    for sock in (push, pull):
        sock.close()
        sock.close()  # idempotent
        assert sock.closed
        assert sock.raw.closed
    with trio.fail_after(GUARD):
        with pytest.raises(trio.ClosedResourceError):
            await pull.receive()
        with pytest.raises(trio.ClosedResourceError):
            await pull.receive_batch()
        with pytest.raises(trio.ClosedResourceError):
            await pull.wait(zmq.POLLIN)
        with pytest.raises(trio.ClosedResourceError):
            await push.send([b"x"])
        with pytest.raises(trio.ClosedResourceError):
            push.try_send([b"x"])
        with pytest.raises(trio.ClosedResourceError):
            await push.wait(zmq.POLLOUT)


# --------------------------------------------------------------------------
# rule 1: the FD is an edge notification; EVENTS is the truth
# --------------------------------------------------------------------------


async def test_wait_returns_at_once_when_the_edge_was_already_consumed(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    push, pull = push_pull(sockets, endpoint())
    await push.send([b"queued"])
    # reading EVENTS consumes the FD's notification: the FD is no longer
    # readable although a message is waiting
    assert events(pull) & zmq.POLLIN
    with trio.fail_after(GUARD):
        await pull.wait(zmq.POLLIN)
        assert await pull.receive() == [b"queued"]


async def test_wait_ignores_wake_ups_for_the_other_direction(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    router, dealer, sent = fill_dealer(sockets, endpoint())
    assert not events(dealer) & zmq.POLLOUT
    woke: list[int] = []

    async def waiter() -> None:
        await dealer.wait(zmq.POLLIN)
        woke.append(events(dealer))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            # the ROUTER reading makes the dealer's FD fire for POLLOUT
            received: list[Frames] = []
            while len(received) < sent:
                received.extend(await router.receive_batch())
            await trio.testing.wait_all_tasks_blocked()
            assert woke == []  # woken for POLLOUT, went back to waiting
            await router.send([b"dealer", b"reply"])
        assert woke and woke[0] & zmq.POLLIN
    assert await dealer.receive() == [b"reply"]


# --------------------------------------------------------------------------
# rule 5: batches, and fairness under a flood
# --------------------------------------------------------------------------


async def test_flood_does_not_starve_other_tasks(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    total = 20_000
    max_messages = 256
    push, pull = push_pull(sockets, endpoint(), hwm=100_000)
    for i in range(total):
        push.raw.send_multipart([b"%d" % i], zmq.NOBLOCK)  # all queued up front

    ticks = 0
    ticks_at_batch: list[int] = []
    received: list[Frames] = []
    done = trio.Event()

    async def other_task() -> None:
        nonlocal ticks
        while not done.is_set():
            await trio.lowlevel.checkpoint()
            ticks += 1

    async def flood_receiver() -> None:
        while len(received) < total:
            batch = await pull.receive_batch(max_messages)
            assert 1 <= len(batch) <= max_messages
            received.extend(batch)
            ticks_at_batch.append(ticks)
        done.set()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            nursery.start_soon(flood_receiver)

    assert received == [[b"%d" % i] for i in range(total)]
    batches = len(ticks_at_batch)
    assert batches >= total // max_messages
    # the other task ran about once per batch while the flood was drained
    assert ticks_at_batch[-1] >= batches // 2
    assert ticks_at_batch[-1] - ticks_at_batch[0] >= batches // 2


@pytest.mark.parametrize("max_messages", [1, 2, 7, 256, 1000])
async def test_receive_batch_returns_between_one_and_max_messages(
    autojump_clock: trio.abc.Clock,
    sockets: Sockets,
    endpoint: Callable[[], str],
    max_messages: int,
) -> None:
    total = 300
    push, pull = push_pull(sockets, endpoint(), hwm=10_000)
    for i in range(total):
        push.raw.send_multipart([b"%d" % i, b"frame 2"], zmq.NOBLOCK)
    received: list[Frames] = []
    with trio.fail_after(GUARD):
        while len(received) < total:
            batch = await pull.receive_batch(max_messages)
            assert 1 <= len(batch) <= max_messages
            # it drains what is there rather than returning early
            assert len(batch) == min(max_messages, total - len(received))
            received.extend(batch)
    assert received == [[b"%d" % i, b"frame 2"] for i in range(total)]


async def test_receive_nowait_takes_only_what_is_queued(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    push, pull = push_pull(sockets, endpoint())
    assert pull.receive_nowait() == []
    for i in range(5):
        await push.send([b"%d" % i])
    assert pull.receive_nowait(2) == [[b"0"], [b"1"]]
    assert pull.receive_nowait() == [[b"2"], [b"3"], [b"4"]]
    assert pull.receive_nowait() == []
    pull.close()
    with pytest.raises(trio.ClosedResourceError):
        pull.receive_nowait()


async def test_receive_batch_waits_for_at_least_one_message(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    push, pull = push_pull(sockets, endpoint())
    batches: list[list[Frames]] = []

    async def receiver() -> None:
        batches.append(await pull.receive_batch(100))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.sleep(5)
            assert batches == []  # nothing queued: it waits, never returns []
            await push.send([b"only"])
    assert batches == [[[b"only"]]]


# --------------------------------------------------------------------------
# rule 6: DEALER and ROUTER_MANDATORY sends wait for room instead of dropping
# --------------------------------------------------------------------------


async def test_dealer_send_waits_for_room_and_loses_nothing(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    total = 1000
    address = endpoint()
    router = sockets.open(zmq.ROUTER, bind=[address], options=[(zmq.RCVHWM, 10)])
    dealer = sockets.open(
        zmq.DEALER,
        connect=[address],
        options=[(zmq.SNDHWM, 10), (zmq.IDENTITY, b"dealer")],
    )
    sent = 0
    finished = trio.Event()

    async def sender() -> None:
        nonlocal sent
        for i in range(total):
            await dealer.send([b"%d" % i])
            sent += 1
        finished.set()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.sleep(5)
            blocked_at = sent
            assert not finished.is_set()
            assert 10 <= blocked_at <= 100  # about SNDHWM + RCVHWM
            await trio.sleep(5)
            assert sent == blocked_at  # still waiting: no drop, no progress

            received: list[Frames] = []
            while len(received) < total:
                received.extend(await router.receive_batch())
        assert finished.is_set()
    assert received == [[b"dealer", b"%d" % i] for i in range(total)]
    assert drain_now(router) == []


async def router_with_dealers(
    sockets: Sockets, address: str, identities: list[bytes], hwm: int
) -> tuple[Socket, dict[bytes, Socket]]:
    """A mandatory ROUTER and connected DEALERs it can already route to."""
    router = sockets.open(
        zmq.ROUTER,
        bind=[address],
        options=[(zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, hwm)],
    )
    dealers = {
        identity: sockets.open(
            zmq.DEALER,
            connect=[address],
            options=[(zmq.IDENTITY, identity), (zmq.RCVHWM, hwm)],
        )
        for identity in identities
    }
    for identity, dealer in dealers.items():
        await dealer.send([b"hello"])
        assert await router.receive() == [identity, b"hello"]
    return router, dealers


@pytest.mark.parametrize(
    "idle_peers",
    [
        pytest.param(0, id="only-peer"),
        # another peer with room makes the ROUTER report POLLOUT while the
        # addressed peer is full: the send must retry, not spin or drop
        pytest.param(1, id="other-peer-has-room"),
    ],
)
async def test_router_mandatory_send_waits_for_room_and_loses_nothing(
    autojump_clock: trio.abc.Clock,
    sockets: Sockets,
    endpoint: Callable[[], str],
    idle_peers: int,
) -> None:
    total = 1000
    idle = [b"idle-%d" % n for n in range(idle_peers)]
    with trio.fail_after(GUARD):
        router, dealers = await router_with_dealers(
            sockets, endpoint(), [b"d1", *idle], hwm=10
        )
        sent = 0
        finished = trio.Event()

        async def sender() -> None:
            nonlocal sent
            for i in range(total):
                await router.send([b"d1", b"%d" % i])
                sent += 1
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.sleep(5)
            blocked_at = sent
            assert not finished.is_set()
            assert 10 <= blocked_at <= 100
            if idle_peers:
                # the case the retry exists for: POLLOUT although d1 is full
                assert events(router) & zmq.POLLOUT
            await trio.sleep(5)
            assert sent == blocked_at

            received: list[Frames] = []
            while len(received) < total:
                received.extend(await dealers[b"d1"].receive_batch())
        assert finished.is_set()
    assert received == [[b"%d" % i] for i in range(total)]
    assert drain_now(dealers[b"d1"]) == []
    for identity in idle:
        assert drain_now(dealers[identity]) == []


async def test_router_mandatory_unknown_peer_raises_unroutable(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    with trio.fail_after(GUARD):
        router, dealers = await router_with_dealers(
            sockets, endpoint(), [b"known"], hwm=10
        )
        with pytest.raises(UnroutableError):
            router.try_send([b"nobody", b"x"])
        with pytest.raises(UnroutableError):
            await router.send([b"nobody", b"x"])
        # the socket is still fine for known peers
        await router.send([b"known", b"after"])
        assert await dealers[b"known"].receive() == [b"after"]
    assert not router.closed


# --------------------------------------------------------------------------
# rule 3: one owning task per socket; no BusyResourceError in normal use
# --------------------------------------------------------------------------


async def echo_forever(router: Socket) -> None:
    while True:
        for frames in await router.receive_batch():
            await router.send(frames)


async def test_one_task_sends_and_receives_on_a_dealer(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    address = endpoint()
    router = sockets.open(zmq.ROUTER, bind=[address], options=[(zmq.SNDHWM, 5)])
    dealer = sockets.open(zmq.DEALER, connect=[address], options=[(zmq.SNDHWM, 5)])
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_forever, router)
            for i in range(200):
                await dealer.send([b"request", b"%d" % i])
                assert await dealer.receive() == [b"request", b"%d" % i]
            nursery.cancel_scope.cancel()


async def test_one_task_sends_bursts_and_receives_on_a_dealer(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    """Bursts bigger than the high-water marks: the owner's sends wait for
    room while the echo task's sends wait too, and it still completes."""
    address = endpoint()
    small = [(zmq.SNDHWM, 3), (zmq.RCVHWM, 3)]
    router = sockets.open(zmq.ROUTER, bind=[address], options=small)
    dealer = sockets.open(zmq.DEALER, connect=[address], options=small)
    burst = 4
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_forever, router)
            for round_trip in range(50):
                expected = [[b"%d-%d" % (round_trip, n)] for n in range(burst)]
                for message in expected:
                    await dealer.send(message)
                replies: list[Frames] = []
                while len(replies) < burst:
                    replies.extend(await dealer.receive_batch())
                assert replies == expected
            nursery.cancel_scope.cancel()


async def test_two_tasks_waiting_on_one_socket_is_a_busy_resource_error(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    """The rule is enforced by Trio, loudly (design rule 3)."""
    _push, pull = push_pull(sockets, endpoint())
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull.receive)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await pull.receive()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# try_send
# --------------------------------------------------------------------------


async def test_try_send_returns_false_when_dealer_queue_is_full(
    autojump_clock: trio.abc.Clock, sockets: Sockets, endpoint: Callable[[], str]
) -> None:
    router, dealer, accepted = fill_dealer(sockets, endpoint())
    assert accepted >= 2
    assert dealer.try_send([b"again"]) is False
    assert dealer.try_send([b"again"]) is False

    with trio.fail_after(GUARD):
        received: list[Frames] = []
        while len(received) < accepted:
            received.extend(await router.receive_batch())
        assert received == [[b"dealer", b"%d" % i] for i in range(accepted)]
        # room again once the peer has read
        await dealer.wait(zmq.POLLOUT)
        assert dealer.try_send([b"more"]) is True
        assert await router.receive() == [b"dealer", b"more"]


async def test_try_send_returns_false_when_dealer_has_no_peer(
    autojump_clock: trio.abc.Clock, sockets: Sockets
) -> None:
    dealer = sockets.open(zmq.DEALER)
    assert dealer.try_send([b"nowhere"]) is False


# --------------------------------------------------------------------------
# Sockets: every socket closed; a shared context is left alone
# --------------------------------------------------------------------------


async def test_sockets_close_closes_its_sockets_not_a_shared_context(
    autojump_clock: trio.abc.Clock,
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: Callable[[], str],
) -> None:
    group = Sockets(context)
    address = endpoint()
    opened = [
        group.open(zmq.PULL, bind=[address]),
        group.open(zmq.PUSH, connect=[address]),
        group.open(zmq.DEALER),
        group.open(zmq.SUB, subscribe=[b""]),
    ]
    for sock in opened:
        assert sock.raw.getsockopt(zmq.LINGER) == 0
        assert not sock.closed
    already_closed = group.open(zmq.PAIR)
    already_closed.close()

    group.close()
    for sock in [*opened, already_closed]:
        assert sock.closed
        assert sock.raw.closed
    assert not context.closed

    # the shared context still makes working sockets (on a fresh address:
    # libzmq releases a closed socket's inproc name asynchronously)
    with trio.fail_after(GUARD), Sockets(context) as again:
        push, pull = push_pull(again, endpoint())
        await push.send([b"still alive"])
        assert await pull.receive() == [b"still alive"]
    assert push.closed and pull.closed
    assert not context.closed


async def test_sockets_close_wakes_a_waiting_task(
    autojump_clock: trio.abc.Clock,
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: Callable[[], str],
) -> None:
    group = Sockets(context)
    _push, pull = push_pull(group, endpoint())
    outcome: list[str] = []

    async def waiter() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await pull.receive()
        outcome.append("closed")

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            group.close()
    assert outcome == ["closed"]
    assert not context.closed


async def test_sockets_terminates_a_context_it_made(
    autojump_clock: trio.abc.Clock, endpoint: Callable[[], str]
) -> None:
    with Sockets() as group:
        push, pull = push_pull(group, endpoint())
        with trio.fail_after(GUARD):
            await push.send([b"x"])
            assert await pull.receive() == [b"x"]
    assert push.closed and pull.closed
    assert group.context.closed


async def test_a_closed_socket_frees_its_inproc_name_at_once(context):
    """A server restarted in the same process binds its names again at once
    (libzmq alone frees them later, in its reaper thread)."""
    with Sockets(context) as sockets:
        for _ in range(200):
            sock = sockets.open(zmq.PUB, bind=["inproc://reused"])
            sock.close()
        # and a generator of endpoints is bound and remembered alike
        sock = sockets.open(zmq.PUB, bind=(e for e in ["inproc://reused"]))
        sock.close()
        sockets.open(zmq.PUB, bind=["inproc://reused"]).close()
