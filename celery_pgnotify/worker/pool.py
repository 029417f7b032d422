"""The process pool: one work queue in the manager, idle children take the next job.

The pool never gives a child more than the one job it runs, so a long task
never delays another while a child is free. A results thread watches every
child's pipe and process sentinel; what it learns is handed to the main
thread as :class:`Event` objects (acks and messaging stay on one thread).

Children are forked on the main thread only (at start, on :meth:`Pool.kick`
and :meth:`Pool.resize`), never on the results thread: a fork copies every
lock as it is at that instant, and a child forked while the main thread was
importing a module (Celery loads the result backend on first use) would
hang forever on its first import of that module.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from celery_pgnotify.wakeup import WakePipe
from celery_pgnotify.worker.child import Job, child_main

logger = logging.getLogger(__name__)


@dataclass
class Event:
    """Something the main thread must act on."""

    kind: str  # "accepted" | "done" | "lost" | "expired"
    task_id: str
    pid: int
    #: the job's delivery tag
    tag: int = 0
    runtime: float = 0.0
    exitcode: int | None = None
    summary: str = ""
    #: how the task ended ("done"): see :mod:`.outcomes`
    outcome: str = ""
    #: a ``Reject`` asked for the message to be requeued
    requeue: bool = False


@dataclass
class Child:
    process: Any
    conn: Connection
    index: int
    ready: bool = False
    job: Job | None = None
    accepted: bool = False  # the child said it started ``job``
    started_at: float = 0.0
    retiring: bool = False


@dataclass
class PoolSettings:
    app_path: str
    concurrency: int
    max_tasks_per_child: int = 0
    max_memory_per_child: int = 0  # KiB, as Celery's worker_max_memory_per_child
    start_method: str = "fork"
    loglevel: str = "INFO"
    logfile: str | None = None
    #: the worker's node name (``name@host``), as tasks see it in ``request.hostname``
    hostname: str = ""
    #: seconds after which a child is replaced once its current task ends (0: never)
    max_lifetime: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def child_args(self, conn: Connection) -> tuple[Any, ...]:
        """The arguments of :func:`~.child.child_main`, talking over ``conn``."""
        return (
            self.app_path,
            conn,
            self.max_tasks_per_child,
            self.loglevel,
            self.logfile,
            self.max_memory_per_child,
            self.hostname,
            self.max_lifetime,
        )


class Pool:
    """Children fed from one queue held here, in the manager."""

    def __init__(
        self,
        settings: PoolSettings,
        on_event: Callable[[Event], None],
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self._ctx: Any = multiprocessing.get_context(settings.start_method)
        self._on_event = on_event
        self._wake_main = wake  # the main thread's loop: a child is to be replaced
        self._refill = False
        self._lock = threading.RLock()
        self._queue: collections.deque[Job] = collections.deque()
        self._children: dict[int, Child] = {}  # by pid
        self._next_index = 1
        self._stopping = False
        self._wakeup = WakePipe()  # wakes the results thread
        #: asked before a job is given to a child: False holds every job back
        self.may_start: Callable[[], bool] = lambda: True
        self._thread = threading.Thread(target=self._watch, name="celery-pg-results", daemon=True)

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.settings.concurrency):
            self._spawn()
        self._thread.start()

    def _spawn(self) -> Child:
        parent_end, child_end = self._ctx.Pipe()
        s = self.settings
        process = self._ctx.Process(
            target=child_main,
            name=f"celery-pg-child-{self._next_index}",
            args=s.child_args(child_end),
            daemon=True,
        )
        process.start()
        child_end.close()
        child = Child(process, parent_end, self._next_index)
        self._next_index += 1
        with self._lock:
            self._children[process.pid] = child
        self._poke()
        logger.debug("Started pool child %s (pid %s)", child.index, process.pid)
        return child

    def stop(self, timeout: float | None = None) -> None:
        """Let running jobs finish (warm), then stop every child."""
        with self._lock:
            self._stopping = True
            children = list(self._children.values())
        deadline = None if timeout is None else time.monotonic() + timeout
        for child in children:
            while child.job is not None and child.process.is_alive():
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            self._send_stop(child)
        for child in children:
            child.process.join(1 if deadline is None else max(0.1, deadline - time.monotonic()))
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
        self._poke()
        self._thread.join(timeout=5)

    def terminate(self) -> None:
        """Cold shutdown: kill every child now."""
        with self._lock:
            self._stopping = True
            children = list(self._children.values())
        for child in children:
            if child.process.is_alive():
                child.process.kill()
        for child in children:
            child.process.join()
        self._poke()

    # -- work ----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._lock:
            self._queue.append(job)
            self._dispatch()

    def queued(self, take: bool = False) -> list[Job]:
        """Jobs waiting for an idle child; with ``take``, taken back from the
        pool (for warm shutdown)."""
        with self._lock:
            jobs = list(self._queue)
            if take:
                self._queue.clear()
        return jobs

    def unqueue(self, tag: int) -> bool:
        """Remove the job of delivery ``tag`` if no child started it yet."""
        with self._lock:
            for job in self._queue:
                if job.tag == tag:
                    self._queue.remove(job)
                    return True
        return False

    def pids(self) -> list[int]:
        with self._lock:
            return list(self._children)

    def resize(self, concurrency: int) -> None:
        """Grow or shrink to ``concurrency`` children (busy ones finish first)."""
        with self._lock:
            self.settings.concurrency = concurrency
            live = [c for c in self._children.values() if not c.retiring]
            # Idle children retire first.
            live.sort(key=lambda c: c.job is not None)
            for child in live[concurrency:]:
                child.retiring = True
                if child.job is None:
                    self._send_stop(child)
        self._fill()

    def _send_stop(self, child: Child) -> None:
        try:
            child.conn.send(("stop",))
        except (OSError, ValueError):
            pass

    def _fill(self) -> None:
        with self._lock:
            if self._stopping:
                return
            missing = self.settings.concurrency - sum(
                1 for c in self._children.values() if not c.retiring
            )
        for _ in range(missing):
            self._spawn()

    def running(self) -> dict[int, tuple[int, float, Job]]:
        """delivery tag -> (pid, started_at, job) of the jobs children are running."""
        with self._lock:
            return {
                c.job.tag: (pid, c.started_at, c.job)
                for pid, c in self._children.items()
                if c.job is not None
            }

    def cancel(self, tag: int, sig: int = signal.SIGUSR1) -> bool:
        """Signal the child running the job of delivery ``tag``.

        The child is retired once the job ends: the task was interrupted at
        an arbitrary point (inside a database driver's protocol, a lock, a
        half-written file), so the process is not trusted with another.
        """
        with self._lock:
            for pid, child in self._children.items():
                if child.job is not None and child.job.tag == tag:
                    child.retiring = True
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        return False
                    return True
        return False

    def _next_job(self) -> Job | None:
        # Called with the lock held. A job whose expiry passed while it
        # waited is never started: the manager marks it revoked.
        now = time.time()
        while self._queue:
            job = self._queue.popleft()
            if job.expires is None or job.expires > now:
                return job
            self._on_event(Event("expired", job.task_id, 0, tag=job.tag))
        return None

    def kick(self) -> None:
        """On the main thread, each turn of its loop: replace children that
        exited, and hand queued jobs to idle children (after
        :attr:`may_start` turned true again)."""
        if self._refill:
            self._refill = False
            self._fill()
        with self._lock:
            self._dispatch()

    def _dispatch(self) -> None:
        # Called with the lock held: hand queued jobs to idle children.
        if self._stopping or not self._queue or not self.may_start():
            return
        for child in self._children.values():
            if not self._queue:
                return
            if child.ready and child.job is None and not child.retiring:
                job = self._next_job()
                if job is None:
                    return
                child.job = job
                child.accepted = False
                child.started_at = time.time()
                try:
                    child.conn.send(("run", job))
                except (OSError, ValueError):
                    # The child is dying; its sentinel fires and the job is
                    # reported lost, so the ack rules decide its fate.
                    logger.warning(
                        "Could not hand %s to child pid %s", job.task_id, child.process.pid
                    )
                logger.debug("Dispatched %s[%s] to child %s", job.name, job.task_id, child.index)

    # -- the results thread ------------------------------------------------------

    def _poke(self) -> None:
        self._wakeup.poke()

    def _watch(self) -> None:
        # One selector for the thread's life, told of each child as it comes
        # and goes (a new one for each wake-up, every descriptor registered
        # again, cost the manager more CPU per task than its claims).
        with selectors.DefaultSelector() as selector:
            selector.register(self._wakeup.fd, selectors.EVENT_READ)
            watched: dict[int, Child] = {}  # pid -> child whose pipe and sentinel are watched
            while True:
                with self._lock:
                    if self._stopping and not self._children:
                        return
                    new = [c for pid, c in self._children.items() if watched.get(pid) is not c]
                for child in new:
                    watched[child.process.pid] = child
                    selector.register(child.conn.fileno(), selectors.EVENT_READ, child)
                    selector.register(child.process.sentinel, selectors.EVENT_READ, child)
                ended = []
                for key, _ in selector.select(timeout=1.0):
                    child = key.data
                    if child is None:
                        self._wakeup.drain()
                    elif key.fd == child.process.sentinel:
                        ended.append(child)
                    else:
                        self._read(child)
                for child in ended:
                    # Before its pipe is closed, whose number may soon be another's.
                    selector.unregister(child.conn.fileno())
                    selector.unregister(child.process.sentinel)
                    watched.pop(child.process.pid, None)
                    self._reap(child)

    def _read(self, child: Child) -> None:
        try:
            while child.conn.poll():
                self._handle(child, child.conn.recv())
        except (EOFError, OSError):
            pass  # the sentinel reports the exit

    def _handle(self, child: Child, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        pid = child.process.pid
        if kind == "ready":
            with self._lock:
                child.ready = True
                self._dispatch()
        elif kind == "accepted":
            with self._lock:
                job = child.job
                child.accepted = True
            self._on_event(Event("accepted", msg[1], pid, tag=job.tag if job else 0))
        elif kind == "done":
            with self._lock:
                job, child.job = child.job, None
                if child.retiring:
                    self._send_stop(child)
                self._dispatch()
            _, task_id, runtime, summary, outcome, requeue = msg
            self._on_event(
                Event(
                    "done",
                    task_id,
                    pid,
                    tag=job.tag if job else 0,
                    runtime=runtime,
                    summary=summary,
                    outcome=outcome,
                    requeue=requeue,
                )
            )
        elif kind == "retire":
            with self._lock:
                child.retiring = True

    def _reap(self, child: Child) -> None:
        self._read(child)  # whatever it said before exiting
        child.process.join()
        pid, code = child.process.pid, child.process.exitcode
        who = f"Pool child {child.index} (pid {pid})"
        with self._lock:
            self._children.pop(pid, None)
            job, child.job = child.job, None
            unexpected = not self._stopping and not child.retiring
            if job is not None and not child.accepted:
                # Handed over but never started: it goes to the next child.
                self._queue.appendleft(job)
                logger.info("%s exited before starting %s[%s]", who, job.name, job.task_id)
                job = None
        if job is not None:
            logger.error(
                "%s exited with code %s while running %s[%s]", who, code, job.name, job.task_id
            )
            self._on_event(Event("lost", job.task_id, pid, tag=job.tag, exitcode=code))
        elif unexpected:
            logger.warning("%s exited with code %s", who, code)
        child.conn.close()
        self._refill = True  # the main thread forks its replacement
        self._wake_main()
