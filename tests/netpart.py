"""A worker behind a network link the test can cut: a network namespace,
a veth pair, and a relay to PostgreSQL on the host's end of the link.

The partition is real: a ``blackhole`` queueing discipline on both ends of
the veth pair drops every packet, so TCP sees silence (no reset, no error),
as when a cable is cut or a host loses power. Needs root and ``ip``/``tc``
(iproute2); :func:`available` says whether this machine has them.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
import uuid
from typing import Any


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    name = f"pgn-{uuid.uuid4().hex[:8]}"
    try:
        _run("ip", "netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    _run("ip", "netns", "del", name)
    return None


class Link:
    """A namespace joined to the host by a veth pair of its own addresses."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.ns = f"pgn-{tag}"
        self.host_if, self.ns_if = f"vh{tag}", f"vn{tag}"
        subnet = random.randrange(0, 256)
        base = random.randrange(0, 64) * 4
        self.host_ip = f"10.213.{subnet}.{base + 1}"
        self.ns_ip = f"10.213.{subnet}.{base + 2}"
        _run("ip", "netns", "add", self.ns)
        try:
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _run("ip", "link", "set", self.ns_if, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            self._in_ns("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self._in_ns("ip", "link", "set", self.ns_if, "up")
            self._in_ns("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        self.cut = False

    def _in_ns(self, *argv: str) -> None:
        _run("ip", "netns", "exec", self.ns, *argv)

    def prefix(self) -> tuple[str, ...]:
        """What runs a command inside the namespace."""
        return ("ip", "netns", "exec", self.ns)

    def partition(self) -> None:
        """Drop every packet both ways, silently."""
        _run("tc", "qdisc", "add", "dev", self.host_if, "root", "blackhole")
        self._in_ns("tc", "qdisc", "add", "dev", self.ns_if, "root", "blackhole")
        self.cut = True

    def heal(self) -> None:
        _run("tc", "qdisc", "del", "dev", self.host_if, "root")
        self._in_ns("tc", "qdisc", "del", "dev", self.ns_if, "root")
        self.cut = False

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class Relay:
    """Forwards TCP connections from ``(host, any port)`` to ``upstream``."""

    def __init__(self, host: str, upstream: tuple[str, int] | str) -> None:
        self.upstream = upstream
        self._server = socket.create_server((host, 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                server = self._connect()
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:  # closed while this pair was being made
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _connect(self) -> socket.socket:
        if not isinstance(self.upstream, str):
            return socket.create_connection(self.upstream)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a Unix-domain socket
        try:
            server.connect(self.upstream)
        except OSError:
            server.close()
            raise
        return server

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._server.close()
            for sock in self._sockets:
                try:
                    sock.close()
                except OSError:
                    pass


def upstream_of(dsn: str) -> tuple[str, int] | str:
    """The server's TCP address, or the path of its Unix-domain socket."""
    from psycopg.conninfo import conninfo_to_dict

    params: dict[str, Any] = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1")
    port = int(params.get("port") or 5432)
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return host, port


def through(url: str, host: str, port: int) -> str:
    """``url`` (a DSN or broker URL) reaching the server at ``host:port``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")])
    return urlunsplit(parts._replace(netloc=f"{user}{host}:{port}", query=query))
