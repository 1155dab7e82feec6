"""Reaching a Dask scheduler: the address from --scheduler or STAINCTL_SCHEDULER, or a local
cluster started for --devices; one clear message when it cannot be reached."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from stainctl.errors import UsageError

if TYPE_CHECKING:
    from distributed import Client

ENV = "STAINCTL_SCHEDULER"
HOW_TO_START = ("start one with `dask scheduler` and `dask worker ADDRESS` on the machines, or "
                "`stainctl cluster slurm`, or leave out --scheduler (and STAINCTL_SCHEDULER) to "
                "run here")


def unreachable(address: str, why: str) -> UsageError:
    return UsageError(f"cannot reach the Dask scheduler at {address} ({why}); {HOW_TO_START}")


def probe(address: str, timeout: float = 5.0, answer: float = 15.0) -> None:
    """Fail at once, with the message, when nothing listens at a tcp:// address (the Dask
    client would retry until its timeout), or when what listens there does not greet as a Dask
    scheduler within `answer` seconds (the client would wait for it without end). An address
    that answered once in this process is not probed again (the main job's steps each check it
    before their work)."""
    if address in _ANSWERED:
        return
    scheme = address.split("://", 1)[0] if "://" in address else _default_scheme()
    parts = urlsplit(address if "://" in address else f"{scheme}://{address}")
    if parts.scheme not in ("tcp", "tls", "ws", "wss"):
        return  # inproc:// and others: the client says
    try:
        host, port = parts.hostname, parts.port
    except ValueError as err:
        raise unreachable(address, f"not an address: {err}") from None
    if not host or not port:
        raise unreachable(address, "no host:port in it")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise unreachable(address, err.strerror or str(err)) from None
    with sock:
        if parts.scheme == "tcp":  # over TLS or websockets the client speaks first
            sock.settimeout(answer)
            _expect_dask(sock, address, answer)
    _ANSWERED.add(address)


_ANSWERED: set[str] = set()


def _default_scheme() -> str:
    """The scheme Dask gives an address written without one (`host:8786`): tcp, unless the
    cluster's Dask configuration says tls."""
    import dask.config

    return str(dask.config.get("distributed.comm.default-scheme", default="tcp"))


# A Dask scheduler speaks first: its handshake message, prefixed by its length as a
# little-endian uint64 (distributed.comm.tcp), a few hundred bytes. Something else listening
# there (the dashboard's port 8787, a web server) says nothing or another protocol, and the
# Dask client then waits without end or dies on a nonsense length (seen: a 3 EiB allocation).
_MAX_HANDSHAKE = 1 << 24
_CHECK_PORT = ("check the port: the scheduler's is 8786 by default, its dashboard's 8787")


def _expect_dask(sock: socket.socket, address: str, answer: float) -> None:
    head = b""
    try:
        while len(head) < 8:
            chunk = sock.recv(8 - len(head))
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        raise unreachable(address, f"something listens there but it did not answer as a Dask "
                          f"scheduler within {answer:g} s (a scheduler greets first); "
                          f"{_CHECK_PORT}, or whether the scheduler is overloaded") from None
    except OSError:  # reset: not a scheduler either
        pass
    length = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < length <= _MAX_HANDSHAKE:
        raise unreachable(address, "something listens there but it does not answer as a Dask "
                          f"scheduler; {_CHECK_PORT}") from None


@contextmanager
def connect(address: str, timeout: str = "20s") -> Iterator[Client]:
    """A client of the scheduler at `address`, closed on leaving."""
    from distributed import Client

    probe(address)
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise unreachable(address, str(err) or type(err).__name__) from None
    with client:
        yield client
