import trio

from tests.chp import RawClient, settle, unique
from trioclone._zmq import Sockets
from trioclone.server.clone import CloneServer
from trioclone.server.settings import Endpoints, ServerSettings


async def test_standalone_smoke(context, autojump_clock):
    endpoints = Endpoints.inproc(unique("smoke"))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            CloneServer(ServerSettings(endpoints), context=context).run
        )
        with Sockets(context) as sockets:
            client = RawClient(sockets, endpoints)
            await settle()
            start = trio.current_time()
            client.set(b"/a/1", b"one", ttl=5)
            update = await client.next_update()
            assert update.sequence == 1 and update.body == b"one"
            entries, end = await client.snapshot()
            assert [e.key for e in entries] == [b"/a/1"] and end.sequence == 1
            gone = await client.next_update()
            assert gone.key == b"/a/1" and gone.body == b"" and gone.sequence == 2
            assert trio.current_time() - start == 5.0
        assert server.core.store.sequence == 2
        nursery.cancel_scope.cancel()
