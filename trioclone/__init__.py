"""trioclone: the ZeroMQ Clone pattern (Model Six) on Trio."""

from trioclone.core.chp import KVMsg as KVMsg
from trioclone.errors import (
    ClientClosedError as ClientClosedError,
    CloneError as CloneError,
    ConfigError as ConfigError,
    LocalProtocolError as LocalProtocolError,
    NoServerError as NoServerError,
    ProtocolError as ProtocolError,
    RemoteProtocolError as RemoteProtocolError,
    WriteTimeoutError as WriteTimeoutError,
)

__version__ = "0.1.0"
