"""CURVE authentication and encryption (ZeroMQ's CurveZMQ, through pyzmq's ``zmq.auth``).

The broker is the CURVE server on its three endpoints; workers and clients are CURVE
clients. Key files are those of ``zmq.auth.create_certificates`` (and of
``fastbroker keygen``): ``NAME.key`` holds a public key, ``NAME.key_secret`` the
secret key and its public key. The broker lets in only the public keys found in its
authorized-keys directory (a ZAP handler, ``zmq.auth.thread.ThreadAuthenticator``).

Key files are read once, when a broker, worker or client is built, into a
``CurveKeys``; ``apply_curve`` then sets one socket's options from it, and every
socket fastbroker creates goes through it (with ``None``: plain sockets, as before).
A bad or missing file is a ConfigError naming it.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import zmq
import zmq.auth
from zmq.utils import z85

from fastbroker._common import ConfigError, zmq_reason

log = logging.getLogger("fastbroker.security")

KeyPath = Union[str, "os.PathLike[str]"]

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
Z85_KEY_SIZE = 40
"""Characters of a CURVE key in Z85 (32 bytes)."""


@dataclass(frozen=True)
class CurveKeys:
    """What one socket needs for CURVE: its own key pair (Z85) and, on a client,
    the server's public key; ``server_key`` None means the socket is the server."""

    public: bytes
    secret: bytes
    server_key: Optional[bytes] = None

    def __repr__(self) -> str:  # never print a secret key in a log or traceback
        role = "server" if self.server_key is None else f"client of {self.server_key.decode()}"
        return f"CurveKeys(public={self.public.decode()}, {role})"


def _check_key(key: Optional[bytes], what: str, path: KeyPath) -> bytes:
    if key is None:
        raise ConfigError(f"no {what} in the key file {os.fspath(path)!r}")
    try:
        if len(key) != Z85_KEY_SIZE or len(z85.decode(key)) != 32:
            raise ValueError
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(
            f"the {what} in the key file {os.fspath(path)!r} is not a CURVE key (40 Z85 characters)"
        ) from None
    return key


def _load(path: KeyPath) -> Tuple[Optional[bytes], Optional[bytes]]:
    try:
        if not os.path.isfile(path):
            raise ConfigError(f"key file {os.fspath(path)!r} does not exist or is not a file")
        return zmq.auth.load_certificate(path)
    except ConfigError:
        raise
    except ValueError:  # the file has no public-key line
        return None, None
    except (OSError, UnicodeError, IndexError) as exc:
        raise ConfigError(f"cannot read the key file {os.fspath(path)!r}: {exc}") from None


def load_public_key(path: KeyPath) -> bytes:
    """The public key in a key file (a ``.key`` file; a ``.key_secret`` one holds it too)."""
    public, _ = _load(path)
    return _check_key(public, "public key", path)


def load_secret_key(path: KeyPath) -> Tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    public, secret = _load(path)
    return _check_key(public, "public key", path), _check_key(secret, "secret key", path)


def client_keys(server_key: Optional[KeyPath], secret: Optional[KeyPath]) -> Optional[CurveKeys]:
    """The keys of a CURVE client (a worker or a client): the broker's public key file
    and this peer's secret key file. Both None: no CURVE. One without the other:
    ConfigError."""
    if server_key is None and secret is None:
        return None
    if server_key is None or secret is None:
        raise ConfigError("curve_server_key and curve_secret go together: give both or neither")
    server = load_public_key(server_key)
    public, secret_key = load_secret_key(secret)
    return CurveKeys(public, secret_key, server)


def server_keys(secret: KeyPath) -> CurveKeys:
    """The keys of the CURVE server (the broker), from its secret key file."""
    public, secret_key = load_secret_key(secret)
    return CurveKeys(public, secret_key, None)


def apply_curve(socket: zmq.Socket, keys: Optional[CurveKeys]) -> None:
    """Make `socket` a CURVE server or client with `keys` (None: leave it plain).
    Must come before the socket binds or connects."""
    if keys is None:
        return
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    if keys.server_key is None:
        socket.setsockopt(zmq.CURVE_SERVER, 1)
    else:
        socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key)


def load_authorized_keys(directory: KeyPath) -> List[bytes]:
    """The public keys of the ``*.key`` files in `directory`; ConfigError for a missing
    directory, a bad file, or no key at all (nobody could connect)."""
    if not os.path.isdir(directory):
        raise ConfigError(f"authorized keys directory {os.fspath(directory)!r} does not exist or is not a directory")
    keys = [
        load_public_key(path)
        for path in sorted(glob.glob(os.path.join(glob.escape(os.fspath(directory)), "*" + PUBLIC_SUFFIX)))
    ]
    if not keys:
        raise ConfigError(
            f"no public key files (*{PUBLIC_SUFFIX}) in the authorized keys directory {os.fspath(directory)!r}"
        )
    return keys


def start_authenticator(context: zmq.Context, directory: KeyPath) -> zmq.auth.thread.ThreadAuthenticator:
    """Start a ZAP handler on `context` that lets in CURVE clients whose public key is
    in `directory` and nobody else. The keys are read now: a key added later needs a
    restart. Stop it (``.stop()``) before terminating the context."""
    from zmq.auth.thread import ThreadAuthenticator

    keys = load_authorized_keys(directory)
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("fastbroker.security.zap"))
    try:
        authenticator.start()
    except zmq.ZMQError as exc:
        authenticator.stop()
        # Only one ZAP handler per context: e.g. the caller's context already has one.
        raise ConfigError(f"cannot start the CURVE authenticator: {zmq_reason(exc)}") from None
    # The ZAP domain of the broker's sockets is empty, which the authenticator files under "*".
    authenticator.configure_curve(domain="*", location=os.fspath(directory))
    log.info("CURVE: %d authorized key(s) from %s", len(keys), os.fspath(directory))
    return authenticator


def create_key_pair(directory: KeyPath, name: str) -> Tuple[str, str]:
    """Write NAME.key (public) and NAME.key_secret (secret, mode 0600) in `directory`
    (created if missing); ConfigError if either file exists. Returns their paths."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ConfigError(f"not a key name: {name!r} (a file name without a directory)")
    directory = os.fspath(directory)
    public_path = os.path.join(directory, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(directory, name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise ConfigError(f"{path!r} already exists; not overwriting it")
    try:
        os.makedirs(directory, exist_ok=True)
        # Created empty first, exclusively and with their final modes, so the secret
        # is never readable by others, not even for a moment, and a file appearing
        # meanwhile is not overwritten; create_certificates then fills them in.
        created = []
        try:
            for path, mode in ((public_path, 0o644), (secret_path, 0o600)):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
                created.append(path)
            written = zmq.auth.create_certificates(directory, name)
        except BaseException:
            for path in created:
                os.unlink(path)
            raise
    except FileExistsError as exc:
        raise ConfigError(f"{exc.filename!r} already exists; not overwriting it") from None
    except OSError as exc:
        raise ConfigError(f"cannot write the key files in {directory!r}: {exc.strerror or exc}") from None
    assert tuple(written) == (public_path, secret_path), written
    return public_path, secret_path


__all__ = [
    "CurveKeys",
    "apply_curve",
    "client_keys",
    "create_key_pair",
    "load_authorized_keys",
    "load_public_key",
    "load_secret_key",
    "server_keys",
    "start_authenticator",
]
