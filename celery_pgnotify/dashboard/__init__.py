"""A small web dashboard (``celery-pg dashboard``): queues with their depth
over the last minutes, consumers, dead letters; retry, drop, purge, pause.

One page (``page.html``: HTML, CSS and plain JavaScript, no build step)
polls ``/api/state`` every two seconds. The state comes from a sampler
thread reading :func:`celery_pgnotify.metrics.snapshot` (bounded whatever
the queues hold) every ``interval`` seconds and keeping the depths of the
last ten minutes, so any number of open pages costs the database one read
per interval.

Changes are off unless a token is given (``--token``, or ``--changes`` for
one made up at start): a change is a POST carrying it in the
``X-Dashboard-Token`` header, which no other site's page can set. The page
takes it from the address's fragment (``#token=...``, never sent to the
server) and keeps it for the tab.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from importlib import resources
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg

from celery_pgnotify import metrics, ops
from celery_pgnotify.connect import close_quietly, connect
from celery_pgnotify.statements import statements

logger = logging.getLogger(__name__)

#: how many samples of each queue's depth are kept (ten minutes at 2 s)
HISTORY = 300
#: the largest request body a change may send
MAX_BODY = 64 * 1024

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Dashboard:
    """The dashboard's state, its sampler and its changes, for one schema."""

    def __init__(
        self, conninfo: str, schema: str, token: str | None = None, interval: float = 2.0
    ) -> None:
        self._conninfo = conninfo
        self._stmts = statements(schema)
        self._token = token
        self._interval = interval
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # the connection, one statement at a time
        self._history: deque[tuple[float, dict[str, int]]] = deque(maxlen=HISTORY)
        self._state: dict[str, Any] = {"error": "starting"}
        #: the last read's error, logged once (not every interval) until a read works
        self._failing: str | None = None
        self._stop = threading.Event()
        self._resample = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def writable(self) -> bool:
        return self._token is not None

    # -- reading --------------------------------------------------------------------

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(
            target=self._run, name="celery-pgnotify-dashboard", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._resample.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            close_quietly(self._conn)
            self._conn = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._resample.wait(self._interval)
            self._resample.clear()
            if not self._stop.is_set():
                self.sample()

    def _with_conn(self, action: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self._conninfo)
                    self._conn.execute(self._stmts.no_jit)
                return action(self._conn)
            except psycopg.OperationalError:
                close_quietly(self._conn)
                self._conn = None
                raise

    def sample(self) -> None:
        """Read the state once (the sampler does, every ``interval``)."""
        try:
            snap, dead = self._with_conn(
                lambda conn: (
                    metrics.snapshot(conn, self._stmts),
                    ops.dead_letters(conn, self._stmts, limit=50),
                )
            )
        except psycopg.Error as exc:
            error = f"cannot read the database: {exc}".strip()
            log = logger.debug if error == self._failing else logger.warning
            log("Dashboard: reading schema %r failed: %s", self._stmts.schema, exc)
            self._failing = error
            self._state = {"error": error}
            return
        if self._failing is not None:
            logger.warning("Dashboard: reading schema %r again", self._stmts.schema)
            self._failing = None
        now = time.time()
        self._history.append((now, {q.name: q.ready for q in snap.queues}))
        self._state = {
            "schema": self._stmts.schema,
            "time": now,
            "writable": self.writable,
            "queues": [self._queue(q) for q in snap.queues],
            "consumers": [_consumer(c) for c in snap.consumers],
            "dead_letters": dead,
            "interval": self._interval,
        }

    def _queue(self, q: metrics.Queue) -> dict[str, Any]:
        return {
            "queue": q.name,
            "ready": q.ready,
            "leased": q.leased,
            "scheduled": q.scheduled,
            "dead_letters": q.dead_letters,
            "oldest_ready_s": q.oldest_ready_s,
            "paused": q.paused,
            "estimated": q.estimated,
            "history": [depths.get(q.name, 0) for _t, depths in self._history],
        }

    def state(self) -> dict[str, Any]:
        return self._state

    # -- changing -------------------------------------------------------------------

    def allowed(self, token: str | None) -> bool:
        return self._token is not None and hmac.compare_digest(
            (token or "").encode(), self._token.encode()
        )

    def change(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run ``action`` (retry, drop, purge, pause, resume) and resample."""
        stmts = self._stmts
        queue = body.get("queue")
        ids = body.get("ids")
        if queue is not None and not isinstance(queue, str):
            raise ValueError("queue must be a string")
        if ids is not None and (
            not isinstance(ids, list) or not all(isinstance(i, int) for i in ids)
        ):
            raise ValueError("ids must be a list of dead letter ids")
        if action in ("retry", "drop") and not (ids or queue):
            raise ValueError("name the dead letters: ids or queue")
        if action in ("purge", "pause", "resume") and not queue:
            raise ValueError("name the queue")
        actions: dict[str, Callable[[psycopg.Connection[Any]], Any]] = {
            "retry": lambda c: ops.retry_dead_letters(c, stmts, queue, ids),
            "drop": lambda c: ops.drop_dead_letters(c, stmts, queue, ids),
            "purge": lambda c: ops.purge(c, stmts, str(queue)),
            "pause": lambda c: ops.pause(c, stmts, str(queue)),
            "resume": lambda c: ops.resume(c, stmts, str(queue)),
        }
        if action not in actions:
            raise LookupError(action)
        result = self._with_conn(actions[action])
        logger.info("Dashboard: %s %s -> %s", action, body, result)
        self._resample.set()
        return {"action": action, "result": result}


def _consumer(c: dict[str, Any]) -> dict[str, Any]:
    claims = sum(c["claims"])
    return {
        "id": c["id"],
        "hostname": c["hostname"],
        "pid": c["pid"],
        "queues": c["queues"],
        "heartbeat_age_s": c["heartbeat_age_s"],
        "hungry": c["hungry"],
        "clock_offset_s": c["clock_offset_s"],
        "claims": claims,
        "mean_claim_ms": 1000 * c["claim_seconds"] / claims if claims else None,
    }


def _page() -> bytes:
    return resources.files(__name__).joinpath("page.html").read_bytes()


def wsgi_app(
    dashboard: Dashboard, hosts: Iterable[str] | None = None
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The dashboard as a WSGI application (the page, its state, its changes).

    ``hosts``: the only host names requests may name (their ``Host``
    header), for a dashboard on a loopback address: another site's page
    whose name was made to resolve to 127.0.0.1 (DNS rebinding) is refused.
    """
    page = _page()
    allowed = {h.lower() for h in hosts} if hosts is not None else None

    def reply(start: StartResponse, status: str, body: bytes, kind: str) -> list[bytes]:
        start(
            status,
            [
                ("Content-Type", kind),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                ("X-Content-Type-Options", "nosniff"),
                ("X-Frame-Options", "DENY"),
            ],
        )
        return [body]

    def as_json(start: StartResponse, status: str, data: Any) -> list[bytes]:
        return reply(start, status, json.dumps(data, default=str).encode(), "application/json")

    def app(environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
        if allowed is not None and _host_name(environ.get("HTTP_HOST", "")) not in allowed:
            return as_json(start, "403 Forbidden", {"error": "unexpected Host header"})
        if method == "GET" and path == "/":
            return reply(start, "200 OK", page, "text/html; charset=utf-8")
        if method == "GET" and path == "/api/state":
            return as_json(start, "200 OK", dashboard.state())
        if method == "POST" and path.startswith("/api/"):
            return as_json(start, *_post(dashboard, environ, path[len("/api/") :]))
        return as_json(start, "404 Not Found", {"error": "not found"})

    return app


def _host_name(host: str) -> str:
    """``Host`` without its port (``[::1]:8080`` -> ``[::1]``)."""
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower()


#: the names a dashboard on a loopback address answers to
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _post(dashboard: Dashboard, environ: dict[str, Any], action: str) -> tuple[str, Any]:
    """A change asked for: (HTTP status, reply)."""
    if not dashboard.allowed(environ.get("HTTP_X_DASHBOARD_TOKEN")):
        return "403 Forbidden", {"error": "changes need the token"}
    try:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        if not 0 <= size <= MAX_BODY:
            raise ValueError("a request body of 0 to 64 KiB, with its length")
        body = json.loads(environ["wsgi.input"].read(size) or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the request must be a JSON object")
        return "200 OK", dashboard.change(action, body)
    except LookupError:
        return "404 Not Found", {"error": f"no action {action!r}"}
    except ValueError as exc:
        return "400 Bad Request", {"error": str(exc)}
    except psycopg.Error as exc:
        return "503 Service Unavailable", {"error": str(exc).strip()}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        logger.debug("Dashboard: " + format, *args)


def serve(dashboard: Dashboard, addr: str, port: int) -> Any:
    """A started HTTP server for ``dashboard`` (``serve_forever`` it). On a
    loopback address it answers only to the loopback's names."""
    loopback = addr in ("127.0.0.1", "localhost", "::1") or addr.startswith("127.")
    hosts = (*LOOPBACK_HOSTS, addr) if loopback else None
    return make_server(
        addr, port, wsgi_app(dashboard, hosts), server_class=_Server, handler_class=_QuietHandler
    )
