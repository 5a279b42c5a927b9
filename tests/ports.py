"""A TCP port for a `jax.distributed` coordinator that a child process binds, held so that no
other process can take it first (standard library only: tests/fake_gcloud.py imports it)."""

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A port that stays ours while the block runs: start the coordinator's processes inside it.

    The coordinator cannot be given port 0: process 0 binds the port of its address on every
    interface ([::]:port) and reports no other. So the port is picked here, by binding port 0 on
    every interface too, and the socket stays open, bound but never listening, with
    SO_REUSEPORT. The coordinator's gRPC server binds with SO_REUSEPORT as well, which Linux
    allows between sockets of one user that both set it, and it gets every connection (only
    listening sockets accept them). Until the block ends, a bind of the port by a socket without
    SO_REUSEPORT fails and a bind to port 0 never gets it, where a port merely picked and closed
    can be taken by another process before the coordinator binds it.
    """
    dual = socket.has_dualstack_ipv6()
    with socket.socket(socket.AF_INET6 if dual else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::" if dual else "", 0))
        yield s.getsockname()[1]
