"""Celery result backend on PostgreSQL; waiters are woken by NOTIFY.

Select it with ``result_backend = "pgnotify://USER:PASSWORD@HOST:PORT/DBNAME"``
(found through Celery's ``celery.result_backends`` entry point; libpq options
may follow ``?``). Options come from ``result_backend_transport_options``:
``schema`` (by default the broker's schema when the broker is pgnotify too,
else ``celery_pgnotify``), ``dsn``, ``connect_timeout`` and ``auto_migrate``,
with the meanings of :mod:`celery_pgnotify.options`.

Storage
=======
Task results live in ``<schema>.results`` (one row per task: status, the
serialized meta Celery reads back, traceback, date_done and, with
``result_extended``, name, args, kwargs, worker, retries and queue); saved
groups in ``result_groups``; chord counters in ``chord_counters``, where one
atomic upsert counts the finished header tasks. Rows carry ``expires_at``
from ``result_expires``: reads ignore expired rows, and :meth:`cleanup`
(Celery beat's daily ``celery.backend_cleanup``) deletes them.

Waiting
=======
Storing a result and announcing it is one statement: the row is upserted and
``pg_notify`` runs in its ``RETURNING``, on a channel derived from the task id,
when someone waits for it. A waiter says so in the task's row
(:meth:`PgNotifyBackend.await_results`, which makes the row, empty, when the
result is not there yet): a result nobody waits for notifies nobody. The
notification carries nothing: any role that can connect may NOTIFY any
channel, so a notification only wakes the waiter, which reads the result from
the table. A process starts listening for a task before it publishes it
(:meth:`PgNotifyBackend.on_task_call`); a waiter marks the row, then reads the
table, so no result can slip between the two (a store in flight makes the mark
wait for its commit); while it waits it re-reads the table every
:data:`~celery_pgnotify.waiting.REREAD_INTERVAL` seconds in case a
notification was lost (``waiting.py``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from celery import states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.base import BaseKeyValueStoreBackend
from celery.exceptions import ImproperlyConfigured
from celery.exceptions import TimeoutError as CeleryTimeoutError

from celery_pgnotify import migrations, statements
from celery_pgnotify.connect import (
    close_with,
    conninfo_from_url,
    forget_after_fork,
    mask_url,
)
from celery_pgnotify.errors import ConfigurationError
from celery_pgnotify.options import TransportOptions
from celery_pgnotify.waiting import ResultConsumer

logger = logging.getLogger(__name__)

_SETTINGS = ("result_backend", "result_backend_transport_options")
_BACKEND_OPTIONS = ("schema", "dsn", "connect_timeout", "auto_migrate")


class _KeyDeleter:
    def __init__(self, backend: PgNotifyBackend) -> None:
        self.delete = backend.delete


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _task_join_will_block() -> bool:
    from celery._state import task_join_will_block

    return bool(task_join_will_block())


def _options(conf: Any) -> TransportOptions:
    """``result_backend_transport_options``, validated; with a pgnotify broker
    its ``schema`` and ``auto_migrate`` are followed unless set here."""
    raw = dict(conf.get("result_backend_transport_options") or {})
    unknown = sorted(k for k in raw if k not in _BACKEND_OPTIONS and k != "global_keyprefix")
    if unknown:
        raise ConfigurationError(
            _SETTINGS[1],
            f"unknown option(s) {', '.join(unknown)}; known: " + ", ".join(_BACKEND_OPTIONS),
        )
    if str(conf.broker_url or "").startswith("pgnotify"):
        broker = conf.broker_transport_options or {}
        for name in ("schema", "auto_migrate"):
            if name not in raw and name in broker:
                raw[name] = broker[name]
    raw.pop("global_keyprefix", None)
    return TransportOptions.from_mapping(raw, setting=_SETTINGS[1])


class PgNotifyBackend(BaseKeyValueStoreBackend, AsyncBackendMixin):  # type: ignore[misc]
    """Result backend storing results in PostgreSQL, woken by LISTEN/NOTIFY."""

    ResultConsumer = ResultConsumer

    supports_native_join = True
    supports_autoexpire = False  # Celery beat schedules celery.backend_cleanup
    implements_incr = True
    persistent = True
    key_t = _text

    def __init__(self, app: Any = None, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url, expires_type=int, **kwargs)
        self.opts = _options(self.app.conf)
        if not url and not self.opts.dsn:
            raise ImproperlyConfigured(
                "result_backend: give a URL such as pgnotify://user:pass@host:5432/dbname"
            )
        self.url = url
        self.conninfo = conninfo_from_url(
            url or "",
            self.opts.dsn,
            self.opts.connect_timeout,
            application_name="celery-pgnotify-results",
            settings=_SETTINGS,
        )
        self.stmts = statements.statements(self.opts.schema)
        self._conn: psycopg.Connection[Any] | None = None
        #: AsyncResults are shared between threads: they open one session
        self._conn_lock = threading.Lock()
        self._pid = os.getpid()
        self._chord_part = threading.local()
        self.result_consumer = self.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages
        )
        forget_after_fork(self)

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return super().__reduce__(args, dict(kwargs or {}, url=self.url))

    def as_uri(self, include_password: bool = False) -> str:
        if include_password or not self.url:
            return super().as_uri(include_password)  # type: ignore[no-any-return]
        return mask_url(self.url)

    # -- connection ----------------------------------------------------------

    def close(self) -> None:
        """Close this backend's connections (it reconnects if used again)."""
        self.result_consumer.stop()
        conn, self._conn = self._conn, None
        if conn is not None and os.getpid() == self._pid:
            conn.close()

    def _forget_after_fork(self) -> None:
        self._conn = None
        self._conn_lock = threading.Lock()  # another thread may have held it
        self._pid = os.getpid()

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        with self._conn_lock:
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                conn = migrations.connect_current(
                    self.conninfo, self.opts.schema, self.opts.auto_migrate
                )
                close_with(self, conn)
                self._conn = conn
        return conn

    def _execute(
        self, statement: str, params: dict[str, Any], lookup: bool = False
    ) -> psycopg.Cursor[Any]:
        """Run one statement; a connection found dead is replaced once.
        Every statement here is idempotent or guarded (a SUCCESS is never
        overwritten), so the retry cannot store anything twice. A ``lookup``
        (rows by key) is planned at each run: a kept plan made while
        ``results`` was empty read all of it per ``.get()`` once it had
        filled (this session may be pooled: no setting can stand in)."""
        prepare = False if lookup else None
        try:
            return self._connection().execute(statement, params, prepare=prepare)
        except psycopg.OperationalError:
            if self._conn is not None and not self._conn.broken and not self._conn.closed:
                raise
            self._conn = None
            return self._connection().execute(statement, params, prepare=prepare)

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        # result_backend_always_retry: lost connections are worth retrying.
        return isinstance(exc, (psycopg.OperationalError, ConnectionError))

    # -- waiting -------------------------------------------------------------

    def on_task_call(self, producer: Any, task_id: str) -> None:
        # Listen before the task is published, so its result cannot be missed.
        if not _task_join_will_block():
            self.result_consumer.consume_from(task_id)

    def forget(self, task_id: str) -> None:
        super().forget(task_id)
        self.result_consumer.cancel_for(task_id)

    def await_results(self, task_ids: Sequence[str]) -> None:
        """Mark ``task_ids`` as waited for, once listening for them: storing
        their results will notify (see *Waiting*)."""
        ids = list(dict.fromkeys(task_ids))
        if ids:
            self._execute(self.stmts.await_results, {"ids": ids, "expires": self.expires or None})

    def fetch_metas(self, task_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The stored metas of ``task_ids`` (those that have one)."""
        rows = self._execute(
            self.stmts.get_results, {"ids": list(task_ids)}, lookup=True
        ).fetchall()
        metas = []
        for task_id, raw in rows:
            meta = self.decode_result(bytes(raw))
            meta.setdefault("task_id", task_id)
            metas.append(meta)
        return metas

    def iter_native(
        self,
        result: Any,
        no_ack: bool = True,
        timeout: float | None = None,
        on_message: Any = None,
        on_interval: Any = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """``ResultSet.join_native()``/``iter_native()``: ``(task_id, meta)`` as
        each member is ready.

        Reads the table once, then once more per wake-up by NOTIFY for the
        members still running. A chord's last header task, which joins the
        whole header, finds every member ready in the first query. This does
        not depend on Celery's per-object pending-result bookkeeping, which
        before Celery 5.7 served only the first object made for a task id.
        """
        members = list(result.results)
        if not members or not all(hasattr(r, "_cache") for r in members):
            # Nested groups: Celery's generic path.
            yield from super().iter_native(
                result,
                no_ack=no_ack,
                timeout=timeout,
                on_message=on_message,
                on_interval=on_interval,
                **kwargs,
            )
            return
        self._ensure_not_eager()
        waiting = list(dict.fromkeys(r.id for r in members))
        for task_id in waiting:
            self.result_consumer.consume_from(task_id)
        self.await_results(waiting)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                ready = {
                    m["task_id"]: m
                    for m in self.fetch_metas(waiting)
                    if m.get("status") in states.READY_STATES
                }
                for task_id in [t for t in waiting if t in ready]:
                    if on_message is not None:
                        on_message(ready[task_id])
                    yield task_id, ready[task_id]
                waiting = [t for t in waiting if t not in ready]
                if not waiting:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CeleryTimeoutError("The operation timed out.")
                # Returns on the next announcement (or after a second).
                self.result_consumer.drain_events(1.0 if left is None else min(left, 1.0))
                if on_interval is not None:
                    on_interval()
        finally:
            for task_id in waiting:
                self.result_consumer.cancel_for(task_id)

    @property
    def client(self) -> Any:
        # Celery 5.3's generic chord code deletes the counter with
        # ``self.client.delete(key)``, assuming a Redis-like client.
        return _KeyDeleter(self)

    # -- storing -------------------------------------------------------------

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = _text(task_id)
        encoded = self.encode(meta)
        data = encoded.encode("utf-8") if isinstance(encoded, str) else bytes(encoded)
        retries = meta.get("retries")
        params = {
            "id": meta["task_id"],
            "status": state,
            "meta": data,
            "name": meta.get("name"),
            "args": _as_text(meta.get("args")),
            "kwargs": _as_text(meta.get("kwargs")),
            "worker": meta.get("worker"),
            "retries": retries if isinstance(retries, int) else None,
            "queue": meta.get("queue"),
            "traceback": traceback,
            "ready": state in states.READY_STATES,
            "expires": self.expires or None,
            "channel": self.stmts.result_channel(meta["task_id"]),
        }
        self._execute(self.stmts.store_result, params)
        return result

    # -- the key-value interface Celery's base class builds on -----------------

    def _split_key(self, key: Any) -> tuple[str, str]:
        key = _text(key)
        for kind, prefix in (
            ("result", self.task_keyprefix),
            ("group", self.group_keyprefix),
            ("chord", self.chord_keyprefix),
        ):
            if key.startswith(prefix):
                return kind, key[len(prefix) :]
        raise ValueError(f"not a result backend key: {key!r}")

    def _by_key(self, kind: str) -> tuple[str, str]:
        """The statements deleting, and giving a new lifetime to, a key of ``kind``."""
        s = self.stmts
        return {
            "result": (s.delete_result, s.expire_result),
            "group": (s.delete_group, s.expire_group),
            "chord": (s.delete_chord, s.expire_chord),
        }[kind]

    def get(self, key: Any) -> bytes | None:
        kind, ident = self._split_key(key)
        statement = self.stmts.get_result if kind == "result" else self.stmts.get_group
        row = self._execute(statement, {"id": ident}, lookup=True).fetchone()
        return bytes(row[0]) if row else None

    def mget(self, keys: Sequence[Any]) -> list[bytes | None]:
        ids = [self._split_key(k)[1] for k in keys]
        rows = self._execute(self.stmts.get_results, {"ids": ids}, lookup=True).fetchall()
        found = {task_id: bytes(raw) for task_id, raw in rows}
        return [found.get(i) for i in ids]

    def set(self, key: Any, value: Any) -> None:
        kind, ident = self._split_key(key)
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if kind == "group":
            self._execute(
                self.stmts.save_group, {"id": ident, "meta": data, "expires": self.expires or None}
            )
            return
        # A task meta written directly (not through store_result).
        meta = self.decode_result(data)
        self._store_result(
            ident, meta.get("result"), meta.get("status", states.PENDING), meta.get("traceback")
        )

    def delete(self, key: Any) -> None:
        kind, ident = self._split_key(key)
        delete, _ = self._by_key(kind)
        self._execute(delete, {"id": ident}, lookup=True)

    def on_chord_part_return(self, request: Any, state: Any, result: Any, **kwargs: Any) -> None:
        # Celery's chord logic calls incr() with the counter's key only: say
        # which header task is counting, so that it counts once.
        self._chord_part.id = getattr(request, "id", None)
        try:
            super().on_chord_part_return(request, state, result, **kwargs)
        finally:
            self._chord_part.id = None

    def incr(self, key: Any) -> int:
        """Count a finished chord header task; the same task counts once
        (the statement is retried after a lost connection, and a task can be
        redelivered)."""
        _, ident = self._split_key(key)
        part = getattr(self._chord_part, "id", None)
        # chord_expires (result_chord_expires) exists from Celery 5.5 on.
        params = {
            "id": ident,
            "part": part,
            "expires": getattr(self, "chord_expires", self.expires) or None,
        }
        statement = self.stmts.chord_incr if part is None else self.stmts.chord_incr_once
        row = self._execute(statement, params, lookup=part is not None).fetchone()
        return int(row[0]) if row else 0  # 0: a repeat after the counter was deleted

    def expire(self, key: Any, value: Any) -> None:
        kind, ident = self._split_key(key)
        _, expire = self._by_key(kind)
        self._execute(expire, {"id": ident, "expires": value}, lookup=True)

    def cleanup(self) -> None:
        """Delete expired results, groups and chord counters."""
        row = self._execute(self.stmts.cleanup_results, {}).fetchone()
        if row and any(row):
            logger.info(
                "Result backend cleanup: %s results, %s groups, %s chord counters expired",
                *row,
            )


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, default=repr)
