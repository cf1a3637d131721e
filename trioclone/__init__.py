"""trioclone: the ZeroMQ Clone pattern (Model Six) on Trio.

``open_client`` (Trio), ``connect`` (blocking) and ``trioclone.aio.connect``
(asyncio; imported on its own) mirror a key-value map kept by a standalone
server or a Binary Star pair (``trioclone serve``).
"""

from trioclone.client.agent import (
    CloneClient as CloneClient,
    MapView as MapView,
    Watch as Watch,
    open_client as open_client,
)
from trioclone.client.blocking import (
    BlockingClient as BlockingClient,
    connect as connect,
)
from trioclone.client.events import (
    CloneEvent as CloneEvent,
    DeleteEvent as DeleteEvent,
    ResyncEvent as ResyncEvent,
    SetEvent as SetEvent,
)
from trioclone.core.chp import KVMsg as KVMsg
from trioclone.core.client import ClientTimings as ClientTimings
from trioclone.curve import Curve as Curve, KeyPair as KeyPair
from trioclone.endpoints import Endpoints as Endpoints
from trioclone.errors import (
    ClientClosedError as ClientClosedError,
    CloneError as CloneError,
    ConfigError as ConfigError,
    LocalProtocolError as LocalProtocolError,
    NoServerError as NoServerError,
    PermissionDeniedError as PermissionDeniedError,
    ProtocolError as ProtocolError,
    RemoteProtocolError as RemoteProtocolError,
    WriteTimeoutError as WriteTimeoutError,
)

__version__ = "0.1.0"
