"""A pool child: takes one job at a time and runs it through Celery's tracer.

Protocol on the child's pipe (all tuples):

    manager -> child   ("run", job)           job: see :class:`Job`
                       ("stop",)              finish and exit
    child -> manager   ("ready", pid)         initialised, can take work
                       ("accepted", task_id, pid, time)
                       ("done", task_id, runtime, summary, outcome, requeue)
                                              summary: result or exception, as text;
                                              outcome: see :mod:`.outcomes` (success,
                                              failure, retry, reject, ignore);
                                              requeue: the Reject exception's flag
                       ("retire", pid)        max tasks, memory or lifetime reached: exiting

SIGUSR1 cancels the running task (revoke with terminate, hard time limit):
the handler raises :class:`TaskCancelled` inside it, which Celery's tracer
records as a failure. User code that swallows it is killed after a grace
period by the manager.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

from celery import states

logger = logging.getLogger(__name__)


class TaskCancelled(BaseException):
    """Raised inside a task cancelled by SIGUSR1 (revoke terminate, hard limit)."""


@dataclass
class Job:
    """What a child needs to run one task message (all picklable)."""

    task_id: str
    name: str
    request: dict[str, Any]
    #: ``(args, kwargs, embed)``, decoded (and checked) by the manager
    body: tuple[Any, Any, Any]
    soft_time_limit: float | None = None
    #: the message's delivery tag: what the manager knows the job by (task
    #: ids repeat: retries, redeliveries and user-chosen ids)
    tag: int = 0
    #: UNIX time after which the task must not start (its ``expires``)
    expires: float | None = None


#: True while a task runs: a signal that arrives between tasks is ignored.
_running = False


def _cancel(signum: int, frame: FrameType | None) -> None:
    if _running:
        raise TaskCancelled("task cancelled (SIGUSR1)")


def _soft_limit(signum: int, frame: FrameType | None) -> None:
    if _running:
        from celery.exceptions import SoftTimeLimitExceeded

        raise SoftTimeLimitExceeded()


def _rss_kib() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def child_main(
    app_path: str,
    conn: Connection,
    max_tasks: int,
    loglevel: str,
    logfile: str | None,
    max_memory_kib: int = 0,
    hostname: str = "",
    max_lifetime: float = 0.0,
) -> None:
    """Entry point of a pool child process."""
    # Shutdown is the manager's decision: it sends ("stop",) or kills.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, _cancel)
    signal.signal(signal.SIGALRM, _soft_limit)

    from celery import signals
    from celery.app.utils import find_app

    app = find_app(app_path)
    app.set_current()
    app.set_default()
    app.log.setup(loglevel=loglevel, logfile=logfile, redirect_stdouts=False)
    app.loader.init_worker_process()
    # A task waiting on another task's result can deadlock the pool: Celery
    # forbids it in its own pool processes (disable_sync_subtasks), so here too.
    from celery._state import _set_task_join_will_block

    _set_task_join_will_block(True)
    signals.worker_process_init.send(sender=None)
    trace = _tracer(app, hostname)
    pid, manager = os.getpid(), os.getppid()
    conn.send(("ready", pid))
    born = time.monotonic()
    done = 0
    try:
        while True:
            message = _next_message(conn, manager)
            if message[0] == "stop":
                break
            job: Job = message[1]
            conn.send(("accepted", job.task_id, pid, time.time()))
            result = _run(job, trace)
            done += 1
            retire = bool(
                (max_tasks and done >= max_tasks)
                or (max_memory_kib and _rss_kib() > max_memory_kib)
                or (max_lifetime and time.monotonic() - born > max_lifetime)
            )
            if retire:  # said first, so the next job is never handed to us
                conn.send(("retire", pid))
            conn.send(("done", job.task_id, *result))
            if retire:
                break
    except (EOFError, OSError):
        pass  # the manager is gone: nothing left to do
    finally:
        signals.worker_process_shutdown.send(sender=None, pid=pid, exitcode=0)


#: Seconds between two looks, while idle, at whether the manager still lives.
PARENT_CHECK = 1.0


def _next_message(conn: Connection, manager: int) -> Any:
    """The manager's next message; EOFError once the manager is gone. Its
    pipe does not say so: a fork inherits every descriptor, so each child
    holds copies of the manager's ends of the pipes, which outlive it (a
    SIGKILLed manager left its idle children waiting for good)."""
    while not conn.poll(PARENT_CHECK):
        if os.getppid() != manager:
            raise EOFError("the manager is gone")
    return conn.recv()


#: Longest result/exception text sent back for task events.
SUMMARY_MAX = 1024


def _tracer(app: Any, hostname: str) -> Any:
    """Run a job through Celery's tracer, as the worker ``hostname``.

    Celery's ``trace_task_ret`` would name the machine, not the worker node,
    in ``request.hostname`` (and so in results and the STARTED state).
    """
    from celery.app.trace import trace_task

    def trace(job: Job) -> tuple[str, str, bool]:
        """``(outcome, summary, requeue)`` of running ``job``."""
        args, kwargs, embed = job.body
        request = dict(job.request, args=args, kwargs=kwargs, is_eager=False)
        request["hostname"] = hostname or job.request.get("hostname")
        request.update(embed or {})
        task = app.tasks[job.name]
        retval, info, _, shown = trace_task(
            task, job.task_id, args, kwargs, request, app=app, hostname=hostname
        )
        if not info:
            return "success", str(shown), False
        exc = getattr(retval, "exception", retval)
        outcome = _OUTCOMES.get(info.state, "failure")
        requeue = bool(getattr(info.retval, "requeue", False))
        if outcome == "reject" and not requeue:
            # Never runs again: a terminal FAILURE, not PENDING forever (as
            # Celery's worker records it since 5.7).
            store = not task.ignore_result or task.store_errors_even_if_ignored
            try:
                task.backend.mark_as_failure(job.task_id, info.retval, store_result=store)
            except Exception:  # the result is lost, never the outcome: still a reject
                logger.exception("Could not store the FAILURE of %s", job.task_id)
        elif outcome == "retry":
            exc = getattr(exc, "exc", None) or exc
        return outcome, str(exc), requeue

    return trace


#: Celery's state of an ended task -> its outcome (see :mod:`.outcomes`).
_OUTCOMES = {
    states.SUCCESS: "success",
    states.FAILURE: "failure",
    states.RETRY: "retry",
    states.REJECTED: "reject",
    states.IGNORED: "ignore",
}


def _run(job: Job, trace: Any) -> tuple[float, str, str, bool]:
    """``(runtime, summary, outcome, requeue)`` of ``job``."""
    global _running
    started = time.monotonic()
    _running = True
    if job.soft_time_limit:
        signal.setitimer(signal.ITIMER_REAL, job.soft_time_limit)
    try:
        outcome, summary, requeue = trace(job)
    except TaskCancelled as exc:
        outcome, summary, requeue = "failure", repr(exc), False
    except BaseException as exc:  # the tracer handles task errors; this is its own failure
        logger.exception("Internal error running task %s[%s]", job.name, job.task_id)
        outcome, summary, requeue = "failure", repr(exc), False
    finally:
        _running = False
        signal.setitimer(signal.ITIMER_REAL, 0)
    return time.monotonic() - started, summary[:SUMMARY_MAX], outcome, requeue
