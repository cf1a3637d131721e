"""trioclone for asyncio programs: ``async with trioclone.aio.connect(...)``.

The client (``trioclone/client/aio.py``) runs the same agent as the
blocking client, in a thread of its own, and never blocks the event loop on
it.  This module is imported on its own (``import trioclone.aio``), so that
``import trioclone`` stays free of asyncio.
"""

from trioclone.client.aio import (
    AsyncioClient as AsyncioClient,
    AsyncioWatch as AsyncioWatch,
    connect as connect,
)
