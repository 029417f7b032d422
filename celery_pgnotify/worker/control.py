"""Remote control for ``celery-pg worker``, answering in Celery's reply format.

The worker listens on Celery's own mailbox (kombu's pidbox ``Node``), so
``celery -A proj inspect ...`` / ``control ...`` and Flower talk to it as
to any Celery worker. Each handler takes the manager as its state, seen
through the :class:`~.state.WorkerState` protocol.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from celery_pgnotify.worker.child import Job
from celery_pgnotify.worker.state import WorkerState

Handler = Callable[..., Any]
HANDLERS: dict[str, Handler] = {}


def handler(fn: Handler) -> Handler:
    HANDLERS[fn.__name__] = fn
    return fn


def _task_info(
    state: WorkerState, job: Job, pid: int | None = None, started: float | None = None
) -> dict[str, Any]:
    entry = state.ledger.inflight.get(job.tag)
    headers = (entry[0].headers or {}) if entry else {}
    return {
        "id": job.task_id,
        "name": headers.get("task"),
        "args": headers.get("argsrepr"),
        "kwargs": headers.get("kwargsrepr"),
        "type": headers.get("task"),
        "hostname": state.hostname,
        "time_start": started,
        "acknowledged": bool(entry and entry[0].acknowledged),
        "delivery_info": dict(entry[0].delivery_info) if entry else {},
        "worker_pid": pid,
    }


def _ids(task_id: Any) -> list[str]:
    return [task_id] if isinstance(task_id, str) else list(task_id or ())


@handler
def ping(state: WorkerState, **kwargs: Any) -> dict[str, str]:
    return {"ok": "pong"}


@handler
def active(state: WorkerState, safe: bool = False, **kwargs: Any) -> list[dict[str, Any]]:
    return [
        _task_info(state, job, pid, started) for pid, started, job in state.pool.running().values()
    ]


@handler
def reserved(state: WorkerState, **kwargs: Any) -> list[dict[str, Any]]:
    return [_task_info(state, job) for job in state.pool.queued()]


@handler
def scheduled(state: WorkerState, **kwargs: Any) -> list[dict[str, Any]]:
    # What this worker holds until due, then what waits in the broker.
    return state.holding.scheduled(state.hostname) + state.held_by_broker()


@handler
def pause_queue(state: WorkerState, queue: Any = "", **kwargs: Any) -> dict[str, str]:
    return state.pause_queue(queue, True)


@handler
def resume_queue(state: WorkerState, queue: Any = "", **kwargs: Any) -> dict[str, str]:
    return state.pause_queue(queue, False)


@handler
def registered(state: WorkerState, taskinfoitems: Any = None, **kwargs: Any) -> list[str]:
    return sorted(name for name in state.app.tasks if not name.startswith("celery."))


@handler
def stats(state: WorkerState, **kwargs: Any) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "clock": "0",
        "uptime": int(time.time() - state.ledger.born),
        "total": dict(state.ledger.total),
        "pool": {
            "implementation": "celery_pgnotify.worker.pool:Pool",
            "max-concurrency": state.pool.settings.concurrency,
            "processes": state.pool.pids(),
            "start-method": state.pool.settings.start_method,
        },
        "prefetch_count": state.prefetch_count,
        "broker": {"transport": "pgnotify"},
    }


@handler
def revoked(state: WorkerState, **kwargs: Any) -> list[str]:
    return list(state.ledger.revoked)


@handler
def revoke(
    state: WorkerState, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
) -> dict[str, str]:
    ids = _ids(task_id)
    for tid in ids:
        state.revoke(tid, terminate=terminate)
    return {"ok": f"tasks {', '.join(ids)} flagged as revoked"}


@handler
def shutdown(state: WorkerState, msg: str = "Got shutdown from remote", **kwargs: Any) -> None:
    state.request_stop(msg)


@handler
def pool_grow(state: WorkerState, n: int = 1, **kwargs: Any) -> dict[str, str]:
    state.pool.resize(state.pool.settings.concurrency + int(n))
    return {"ok": f"pool will grow to {state.pool.settings.concurrency}"}


@handler
def pool_shrink(state: WorkerState, n: int = 1, **kwargs: Any) -> dict[str, str]:
    state.pool.resize(max(1, state.pool.settings.concurrency - int(n)))
    return {"ok": f"pool will shrink to {state.pool.settings.concurrency}"}


@handler
def time_limit(
    state: WorkerState,
    task_name: str,
    hard: float | None = None,
    soft: float | None = None,
    **kwargs: Any,
) -> dict[str, str]:
    task = state.app.tasks.get(task_name)
    if task is None:
        return {"error": f"unknown task {task_name}"}
    task.time_limit, task.soft_time_limit = hard, soft
    return {"ok": "time limits set successfully"}


@handler
def rate_limit(
    state: WorkerState, task_name: str, rate_limit: Any = None, **kwargs: Any
) -> dict[str, str]:
    """``celery control rate_limit TASK RATE``: takes effect for the next message."""
    from celery.utils.time import rate

    task = state.app.tasks.get(task_name)
    if task is None:
        return {"error": f"unknown task {task_name}"}
    try:
        rate(rate_limit)
    except ValueError as exc:
        return {"error": f"invalid rate limit string: {exc!r}"}
    task.rate_limit = rate_limit
    state.reset_rate_limit(task_name)
    if not rate_limit:
        return {"ok": "rate limit disabled successfully"}
    return {"ok": "new rate limit set successfully"}


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
