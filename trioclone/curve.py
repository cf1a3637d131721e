"""CURVE key pairs: made by ``trioclone keygen``, read by servers and clients.

A key pair is two certificate files in the ZeroMQ certificate format
(czmq's zcert, pyzmq's ``zmq.auth``): ``NAME.key`` holds the public key,
``NAME.key_secret`` (mode 0600) both keys.  Each key is 40 characters of
Z85 text for 32 bytes.

A pair of servers shares one key pair, so a client needs one server key
and the servers know each other by it.  A server allows the clients whose
public certificates are in a folder, each known by its file's NAME.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from trioclone.errors import ConfigError

log = logging.getLogger("trioclone.curve")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_TEXT = 40  # Z85 characters of a 32-byte key
MAX_CERTIFICATE = 65_536  # bytes: a certificate is a few hundred

_BANNER = """\
#   trioclone CURVE {kind} certificate (ZeroMQ zcert format)
#   {advice}
"""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, each key as Z85 text (what libzmq's options take)."""

    public: bytes
    secret: bytes

    @classmethod
    def new(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


@dataclass(frozen=True)
class Curve:
    """The CURVE options of one process's sockets.

    ``server``: the key pair a server's bound sockets use (the pair's).
    ``client``: the key pair its connected sockets use, and ``server_key``
    the public key they expect at the other end.  A server of a pair uses
    the pair's key pair for both: its peer knows it by that key.
    """

    server: KeyPair | None
    client: KeyPair
    server_key: bytes

    @classmethod
    def for_server(cls, pair: KeyPair) -> Curve:
        return cls(pair, pair, pair.public)

    @classmethod
    def for_client(cls, server_key: bytes, own: KeyPair) -> Curve:
        return cls(None, own, server_key)

    @classmethod
    def client_files(cls, server_key: str | Path, client_key: str | Path) -> Curve:
        """A client's options from the servers' public certificate and its
        own secret one (``ConfigError`` naming a file that will not do)."""
        return cls.for_client(
            read_public(Path(server_key)), read_key_pair(Path(client_key))
        )

    def options(self, binds: bool) -> list[tuple[int, int | bytes]]:
        """The options of a socket that binds (the CURVE server side) or
        connects (the client side)."""
        if binds:
            if self.server is None:
                raise ConfigError("a client's socket cannot bind with CURVE")
            return [
                (zmq.CURVE_SERVER, 1),
                (zmq.CURVE_PUBLICKEY, self.server.public),
                (zmq.CURVE_SECRETKEY, self.server.secret),
            ]
        return [
            (zmq.CURVE_SERVERKEY, self.server_key),
            (zmq.CURVE_PUBLICKEY, self.client.public),
            (zmq.CURVE_SECRETKEY, self.client.secret),
        ]


def write_key_pair(folder: Path, name: str, pair: KeyPair | None = None) -> KeyPair:
    """Write ``NAME.key`` and ``NAME.key_secret`` (0600) in ``folder``.

    Refuses (``ConfigError``) a name that is not a plain file name and
    files that exist: a key is never overwritten."""
    check_name(name)
    pair = pair or KeyPair.new()
    public_path = folder / f"{name}{PUBLIC_SUFFIX}"
    secret_path = folder / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} exists: a key is never overwritten")
    public = _certificate(
        "public", "Give this file to the other side.", pair.public, None
    )
    secret = _certificate(
        "secret",
        "Keep this file secret: whoever has it can act as its owner.",
        pair.public,
        pair.secret,
    )
    try:
        _write_new(secret_path, secret, 0o600)
        _write_new(public_path, public, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write the key pair {name!r}: {exc}") from exc
    return pair


def check_name(name: str) -> None:
    """A key pair's NAME: a plain file name that does not start with "."
    or "@" (the pair's own User-Id is ``@pair``)."""
    if (
        not name
        or name[0] in ".@"
        or Path(name).name != name
        or not name.isprintable()
        or not _utf8(name)
    ):
        raise ConfigError(
            "a key's name must be a plain, printable UTF-8 file name, not "
            f"starting with . or @: {name!r}"
        )


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a file name's undecodable bytes
        return False
    return True


def _certificate(kind: str, advice: str, public: bytes, secret: bytes | None) -> str:
    lines = [_BANNER.format(kind=kind, advice=advice), "metadata\n", "curve\n"]
    lines.append(f'    public-key = "{public.decode()}"\n')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"\n')
    return "".join(lines)


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)


def read_public(path: Path) -> bytes:
    """The public key in a certificate (public or secret); ``ConfigError``
    naming the file if it has none or it is not a certificate."""
    public, _ = _read(path)
    return public


def read_key_pair(path: Path) -> KeyPair:
    """Both keys of a secret certificate; ``ConfigError`` naming the file if
    it lacks one.  A file others may read is used, with a warning."""
    public, secret = _read(path)
    if secret is None:
        raise ConfigError(
            f"{path} has no secret key: give the NAME{SECRET_SUFFIX} file "
            f"of the key pair, not the {PUBLIC_SUFFIX} file"
        )
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "%s can be read by other users (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{path}: its public key is not its secret key's")
    return KeyPair(public, secret)


def read_public_folder(
    folder: Path, problems: list[ConfigError] | None = None
) -> dict[bytes, str]:
    """Public key -> NAME for every ``NAME.key`` in ``folder``.

    A file that cannot be used raises ``ConfigError`` naming it (the whole
    folder is refused rather than a client silently left out); with
    ``problems``, it is left out (never allowed) and its error appended."""
    try:
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder of client certificates")
        paths = sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))
    except OSError as exc:
        raise ConfigError(f"cannot read the folder {folder}: {exc}") from exc
    allowed: dict[bytes, str] = {}
    for path in paths:
        try:
            name = path.name.removesuffix(PUBLIC_SUFFIX)
            try:
                check_name(name)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            public = read_public(path)
            if public in allowed:
                raise ConfigError(
                    f"{path}: the same key as {allowed[public]}{PUBLIC_SUFFIX}"
                )
        except ConfigError as problem:
            if problems is None:
                raise
            problems.append(problem)
            continue
        allowed[public] = name
    return allowed


def _read(path: Path) -> tuple[bytes, bytes | None]:
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block
            raise ConfigError(f"the key file {path} is not a regular file")
        with path.open("rb") as file:
            text = file.read(MAX_CERTIFICATE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc}") from exc
    if len(text) > MAX_CERTIFICATE:
        raise ConfigError(
            f"{path} is over {MAX_CERTIFICATE} bytes: not a CURVE certificate"
        )
    keys: dict[bytes, bytes] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(b"#") or b"=" not in line:
            continue
        name, _, value = line.partition(b"=")
        if name.strip() in (b"public-key", b"secret-key"):
            keys[name.strip()] = value.strip().strip(b"\"'")
    public = keys.get(b"public-key")
    if public is None:
        raise ConfigError(f"{path} is not a CURVE certificate: no public-key")
    for name, key in keys.items():
        _check_key(path, name.decode(), key)
    return public, keys.get(b"secret-key")


def _check_key(path: Path, name: str, key: bytes) -> None:
    try:
        ok = len(key) == KEY_TEXT and len(z85.decode(key)) == 32
    except Exception:  # z85 raises struct.error, ValueError, KeyError...
        ok = False
    if not ok:
        raise ConfigError(
            f"{path}: its {name} is not a CURVE key ({KEY_TEXT} Z85 characters)"
        )
