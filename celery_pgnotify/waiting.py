"""How ``.get()`` waits: a LISTEN session for the results this process awaits.

One LISTEN connection per result backend (Celery keeps one backend per
thread, and an ``AsyncResult`` may be waited on from any thread). A
notification only wakes: the waiter reads the result from the table (see
``backend.py``, *Waiting*).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from celery import states
from celery.backends.asynchronous import BaseResultConsumer

from celery_pgnotify.connect import close_with, forget_after_fork
from celery_pgnotify.listening import Listening
from celery_pgnotify.wakeup import WakePipe

logger = logging.getLogger(__name__)

#: Seconds between re-reads of the results still awaited, should a
#: notification have been lost.
REREAD_INTERVAL = 5.0


class ResultConsumer(BaseResultConsumer):  # type: ignore[misc]
    """Listens for the results this process waits on.

    One LISTEN connection per backend instance (Celery keeps one backend per
    thread). Notifications may be read by whichever thread holds the
    connection: they are queued in an inbox and handled under the lock, and a
    pipe wakes a thread waiting on the socket.
    """

    _connection_errors = (psycopg.OperationalError,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._listen = Listening(self._on_channel)
        self._channels: dict[str, str] = {}  # channel -> task id
        self._to_unlisten: set[str] = set()
        self._inbox: deque[str] = deque()  # ids of tasks announced, to read
        self._next_reread = time.monotonic() + REREAD_INTERVAL
        self._wakeup: WakePipe | None = None  # made with the first connection
        forget_after_fork(self)

    # -- the interface Celery calls ------------------------------------------

    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def stop(self) -> None:
        with self._lock:
            self._close()

    def consume_from(self, task_id: str) -> None:
        channel = self.backend.stmts.result_channel(task_id)
        with self._locked():
            self._to_unlisten.discard(channel)
            if self._channels.get(channel) == task_id and self._listen.is_open:
                return
            self._channels[channel] = task_id
            try:
                if not self._listen.is_open:
                    # (Re)connecting listens to every channel, this one
                    # included, and re-reads what may have been missed.
                    self._connection()
                else:
                    self._listen.sync(self._channels)
            except psycopg.OperationalError:
                # The next drain reconnects, listens again and re-reads.
                self._drop()

    def cancel_for(self, task_id: str) -> None:
        # Never blocks (Celery calls this from AsyncResult.__del__): when the
        # lock is taken, its holder unlistens on the way out.
        self._to_unlisten.add(self.backend.stmts.result_channel(task_id))
        if self._lock.acquire(blocking=False):
            try:
                self._flush_unlisten()
            finally:
                self._lock.release()

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        # Listening already: say we wait, then read; a result stored before
        # that is in the table, one stored after it notifies.
        members = getattr(result, "results", None)
        self.backend.await_results([r.id for r in members] if members else [result.id])
        for meta in result._iter_meta(**kwargs):
            if meta is not None:
                self.on_state_change(meta, None)

    def on_state_change(self, meta: dict[str, Any], message: Any) -> None:
        super().on_state_change(meta, message)
        if meta.get("status") in states.READY_STATES and meta.get("task_id"):
            self.cancel_for(meta["task_id"])

    def drain_events(self, timeout: float | None = None) -> None:
        wait = 1.0 if timeout is None else max(0.0, min(timeout, 1.0))
        try:
            self._drain(wait)
        except psycopg.OperationalError as exc:
            # PostgreSQL is away: keep trying while the caller's timeout runs.
            logger.warning("Result backend: cannot reach PostgreSQL (%s); retrying", exc)
            with self._locked(wait) as locked:
                if locked:
                    self._drop()
            time.sleep(wait)

    def _drain(self, wait: float) -> None:
        if not self._inbox:
            with self._locked(wait) as locked:
                if not locked:
                    return
                conn = self._connection()
                self._read(conn)
            if not self._inbox:
                self._wait(conn, wait)
            if not self._inbox and time.monotonic() >= self._next_reread:
                # A notification can be lost (a LISTEN session cut between
                # two reads): what is awaited is read again now and then.
                with self._locked(wait) as locked:
                    if locked:
                        self._inbox.extend(self._channels.values())
        if self._inbox:
            self._next_reread = time.monotonic() + REREAD_INTERVAL
        with self._locked(wait) as locked:
            if locked:
                self._handle_inbox()

    def on_after_fork(self) -> None:
        self._forget_after_fork()

    # -- the connection ------------------------------------------------------

    @contextmanager
    def _locked(self, timeout: float | None = None) -> Iterator[bool]:
        locked = self._lock.acquire(timeout=-1 if timeout is None else timeout)
        try:
            yield locked
        finally:
            if locked:
                try:
                    self._flush_unlisten()
                finally:
                    self._lock.release()

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._listen.conn
        if conn is None or conn.closed:
            reconnecting = self._listen.opened_before
            if self._wakeup is None:
                self._wakeup = WakePipe()
            conn = self._listen.open(self.backend.conninfo, self._channels)
            close_with(self, conn)
            if reconnecting:
                # Whatever happened while disconnected is in the table.
                self._inbox.extend(self._channels.values())
        return conn

    def _drop(self) -> None:
        self._listen.close()

    def _close(self) -> None:
        self._drop()
        self._channels.clear()
        self._to_unlisten.clear()
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.close()

    def _forget_after_fork(self) -> None:
        # The parent's socket and pipe are not ours to use or close.
        self._listen.forget()
        self._lock = threading.Lock()
        self._channels = {}
        self._to_unlisten = set()
        self._inbox = deque()
        self._wakeup = None  # the parent's descriptors: never touched here

    def _flush_unlisten(self) -> None:
        if not self._to_unlisten:
            return
        while self._to_unlisten:
            self._channels.pop(self._to_unlisten.pop(), None)
        if self._listen.is_open:
            try:
                self._listen.sync(self._channels)
            except psycopg.OperationalError:
                self._drop()

    # -- notifications -------------------------------------------------------

    def _on_channel(self, channel: str) -> None:
        # A wake-up, never data (see listening.py).
        task_id = self._channels.get(channel)
        if task_id is None:
            return
        self._inbox.append(task_id)
        if self._wakeup is not None:
            self._wakeup.poke()

    def _read(self, conn: psycopg.Connection[Any]) -> None:
        """Move notifications already received into the inbox (no waiting)."""
        try:
            if self._listen.conn is conn:
                self._listen.read()
        except psycopg.OperationalError:
            logger.warning("Result backend: lost the LISTEN connection; reconnecting")
            self._drop()

    def _wait(self, conn: psycopg.Connection[Any], timeout: float) -> None:
        wakeup = self._wakeup
        notified, readable = self._listen.wait(timeout, wakeup.fd if wakeup is not None else -1)
        if wakeup is not None and wakeup.fd in readable:
            wakeup.drain()
        if notified:
            with self._locked() as locked:
                if locked:
                    self._read(conn)

    def _handle_inbox(self) -> None:
        to_fetch: dict[str, None] = {}
        while self._inbox:  # other threads may append meanwhile
            to_fetch[self._inbox.popleft()] = None
        if to_fetch:
            for meta in self.backend.fetch_metas(to_fetch):
                self.on_state_change(meta, None)
