"""Turning a broker URL into libpq connection parameters, and connecting."""

from __future__ import annotations

import os
import select
import weakref
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from celery_pgnotify.errors import ConfigurationError

#: Dead peers are noticed by TCP keepalives unless the DSN says otherwise
#: (about 25 s of silence), and data left unacknowledged for 30 s drops the
#: connection (``tcp_user_timeout``): a silent network drop never blocks a
#: statement for the kernel's ~15 minutes of retransmissions.
_KEEPALIVE_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}
if psycopg.pq.version() >= 120000:  # libpq 12 knows tcp_user_timeout
    _KEEPALIVE_DEFAULTS["tcp_user_timeout"] = "30000"

#: The same on the server's side of a session whose liveness matters (a
#: consumer's session lock, beat's leader lock): the server ends it, and
#: releases its locks, about 25 s after the client's host went silent,
#: instead of after the server's default of about two hours.
SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
_SCHEMES = ("pgnotify", "postgresql", "postgres")


def conninfo_from_url(
    url: str,
    dsn: str | None,
    connect_timeout: float,
    application_name: str = "celery-pgnotify",
    settings: tuple[str, str] = ("broker_url", "broker_transport_options"),
) -> str:
    """The libpq conninfo for a ``pgnotify://`` URL (or the ``dsn`` option).

    libpq query options in the URL (``sslmode``, ``sslrootcert``, ...) pass
    through unchanged. ``settings`` names the URL setting and the options
    mapping in error messages.
    """
    source = dsn if dsn else url
    setting = f"{settings[1]}['dsn']" if dsn else settings[0]
    if "://" in source:
        parts = urlsplit(source)
        if parts.scheme not in _SCHEMES:
            raise ConfigurationError(
                setting, f"scheme {parts.scheme!r} is not one of {', '.join(_SCHEMES)}"
            )
        source = urlunsplit(("postgresql",) + tuple(parts)[1:])
    try:
        params = conninfo_to_dict(source)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(setting, f"not a valid PostgreSQL DSN: {exc}") from None
    for key, value in _KEEPALIVE_DEFAULTS.items():
        params.setdefault(key, value)
    params.setdefault("connect_timeout", str(max(1, int(connect_timeout))))
    params.setdefault("application_name", application_name)
    return make_conninfo("", **params)


#: libpq parameters holding secrets, masked wherever a URL is shown.
_SECRET_PARAMETERS = frozenset(("password", "sslpassword"))


def session_options(conninfo: str, settings: dict[str, Any]) -> str:
    """The libpq ``options`` of ``conninfo`` with ``-c name=value`` for each
    of ``settings`` added (settings already in the DSN's own options win)."""
    options = str(conninfo_to_dict(conninfo).get("options") or "")
    extra = [f"-c {name}={value}" for name, value in settings.items() if name not in options]
    return " ".join([options, *extra]).strip()


def mask_url(url: str, mask: str = "**") -> str:
    """``url`` with its password (in the user info or as a ``password`` or
    ``sslpassword`` query parameter) replaced by ``mask``."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=f"{parts.username or ''}:{mask}@{netloc[1]}")
    if parts.query:
        fields = []
        for field in parts.query.split("&"):
            key = unquote_plus(field.split("=", 1)[0]).strip().lower()
            fields.append(
                f"{field.split('=', 1)[0]}={mask}" if key in _SECRET_PARAMETERS else field
            )
        parts = parts._replace(query="&".join(fields))
    return urlunsplit(parts)


def received_notifies(conn: psycopg.Connection[Any]) -> Iterator[tuple[str, str]]:
    """``(channel, payload)`` of the notifications already on ``conn``'s socket
    (never waits); raises ``OperationalError`` when the session is gone."""
    pgconn = conn.pgconn
    pgconn.consume_input()
    if pgconn.status != psycopg.pq.ConnStatus.OK:
        raise psycopg.OperationalError("the LISTEN session was closed by the server")
    while True:
        n = pgconn.notifies()
        if n is None:
            return
        yield n.relname.decode(), n.extra.decode()


def wait_readable(fds: list[int], timeout: float | None) -> list[int]:
    """The descriptors of ``fds`` readable within ``timeout`` seconds.

    ``poll()``, not ``select()``: a process with many open files (a large
    pool, many sockets) has descriptors above 1024, which ``select()``
    refuses.
    """
    poller = select.poll()
    for fd in fds:
        if fd >= 0:  # -1: a pipe closed meanwhile
            poller.register(fd, select.POLLIN | select.POLLPRI)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    return [fd for fd, _ in poller.poll(ms)]


def connect(conninfo: str) -> psycopg.Connection[Any]:
    """An autocommit connection; every hot-path statement is a single statement."""
    conn = psycopg.Connection.connect(conninfo, autocommit=True)
    _connections.add(conn)
    return conn


def close_with(owner: Any, conn: psycopg.Connection[Any]) -> None:
    """Close ``conn`` when ``owner`` is garbage collected (Celery keeps one
    result backend per thread, gone with its thread), in this process only:
    a forked child must never close its parent's connection."""
    weakref.finalize(owner, _close_in, conn, os.getpid())


def _close_in(conn: psycopg.Connection[Any], pid: int) -> None:
    if os.getpid() == pid and not conn.closed:
        close_quietly(conn)


def close_quietly(conn: psycopg.Connection[Any] | None) -> None:
    """Close ``conn`` (if any), whatever state it is in: its server may be gone."""
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error:
            pass


# --- fork safety ------------------------------------------------------------
# A child forked after a connection exists (Celery's prefork pool) must never
# use it, nor close it: closing sends a Terminate message on the socket the
# parent still uses. After a fork each registered owner drops its references,
# and the child closes its copies of the sockets' descriptors (a bare close,
# nothing sent): otherwise a child would keep the parent's sessions, and the
# advisory locks that prove a consumer alive, open after the parent died.

_owners: weakref.WeakSet[Any] = weakref.WeakSet()
_connections: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


def forget_after_fork(owner: Any) -> None:
    """Have ``owner._forget_after_fork()`` called in a forked child while it lives."""
    _owners.add(owner)


def _after_fork_in_child() -> None:
    for owner in list(_owners):
        owner._forget_after_fork()
    for conn in list(_connections):
        try:
            fd = conn.pgconn.socket
        except psycopg.Error:
            continue  # closed already
        # psycopg finishes a connection only in the process that opened it.
        try:
            os.close(fd)
        except OSError:
            pass
    _connections.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
