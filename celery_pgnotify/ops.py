"""What the operations commands read and change (``celery-pg status`` and friends).

Each function takes an open autocommit connection and the schema's
statements, and returns plain data; :mod:`celery_pgnotify.cli` prints it as
a table or as JSON.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

import psycopg

from celery_pgnotify.statements import Statements


def status(conn: psycopg.Connection[Any], stmts: Statements) -> dict[str, Any]:
    """Queues (ready, leased, delayed, oldest age, dead letters, scheduled in the
    database and when the next is due) and consumers.

    The counts are the metrics' (:func:`metrics.queue_figures`): exact up to
    ``metrics.CAP`` per queue, estimated beyond (``estimated``), so that a
    backlog of millions costs this no more than a scrape. ``delayed`` is
    counted among the first ``CAP`` leased messages (their ETAs are in their
    payloads), and scaled to the queue's leased count beyond."""
    from celery_pgnotify.metrics import CAP, queue_figures

    figures = queue_figures(conn, stmts)
    delayed: dict[str, int] = {}
    read: dict[str, int] = {}
    now = time.time()
    etas = conn.execute(stmts.status_etas, {"cap": CAP}).fetchall()
    for queue, eta in etas:
        read[queue] = read.get(queue, 0) + 1
        if eta and _timestamp(eta) > now:
            delayed[queue] = delayed.get(queue, 0) + 1
    if len(etas) >= CAP:  # a sample: each queue's share of it, scaled
        for q in figures:
            if read.get(q.name):
                delayed[q.name] = round(delayed.get(q.name, 0) * q.leased / read[q.name])
            q.estimated = q.estimated or q.leased > 0
    names = [q.name for q in figures]
    next_due = dict(conn.execute(stmts.status_next_due, {"queues": names}).fetchall())
    queues = [
        {
            "queue": q.name,
            "ready": q.ready,
            "leased": q.leased,
            "delayed": delayed.get(q.name, 0),
            "oldest_ready_s": None if q.oldest_ready_s is None else round(q.oldest_ready_s, 1),
            "dead_letters": q.dead_letters,
            "scheduled": q.scheduled,
            "next_due_s": None if next_due.get(q.name) is None else round(next_due[q.name], 1),
            "paused": q.paused,
            "estimated": q.estimated,
        }
        for q in figures
    ]
    consumers = [
        {
            "id": cid,
            "hostname": hostname,
            "pid": pid,
            "queues": list(queue_names),
            "started_at": started.isoformat(),
            "last_heartbeat_s": round(float(silent), 1),
            "hungry": hungry,
            "last_fed_s": round(float(fed), 1),
        }
        for cid, hostname, pid, queue_names, started, silent, hungry, fed in conn.execute(
            stmts.status_consumers
        ).fetchall()
    ]
    return {"schema": stmts.schema, "queues": queues, "consumers": consumers}


def _timestamp(text: str) -> float:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def purge(conn: psycopg.Connection[Any], stmts: Statements, queue: str) -> int:
    """Delete the ready messages of ``queue`` (leased ones finish normally)."""
    row = conn.execute(stmts.purge, {"name": queue}).fetchone()
    return int(row[0]) if row else 0


def pause(conn: psycopg.Connection[Any], stmts: Statements, queue: str) -> bool:
    """Stop every claim from ``queue`` (publishing goes on); False when it
    was paused already."""
    return conn.execute(stmts.pause_queue, {"name": queue}).fetchone() is not None


def resume(conn: psycopg.Connection[Any], stmts: Statements, queue: str) -> bool:
    """Let ``queue`` be claimed from again, waking its consumers; False when
    it was not paused."""
    params = {"name": queue, "prefix": stmts.channel_prefix}
    return conn.execute(stmts.resume_queue, params).fetchone() is not None


def pause_queue(app: Any, queue: str) -> bool:
    """:func:`pause` through the broker connection of Celery ``app``."""
    return _through_app(app, pause, queue)


def resume_queue(app: Any, queue: str) -> bool:
    """:func:`resume` through the broker connection of Celery ``app``."""
    return _through_app(app, resume, queue)


def _through_app(app: Any, action: Any, queue: str) -> bool:
    from celery_pgnotify.errors import ConfigurationError
    from celery_pgnotify.transport import Transport

    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        transport = connection.transport
        if not isinstance(transport, Transport):
            raise ConfigurationError("broker_url", "pausing a queue needs a pgnotify:// broker")
        return bool(action(transport.work_conn(), transport.stmts, queue))


def _selection(queue: str | None, ids: list[int] | None) -> dict[str, Any]:
    return {"queue": queue, "ids": ids or None}


def dead_letters(
    conn: psycopg.Connection[Any],
    stmts: Statements,
    queue: str | None = None,
    ids: list[int] | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Dead letters, oldest first, with the task name and id when readable."""
    rows = conn.execute(
        stmts.dead_letters_list, {**_selection(queue, ids), "limit": limit}
    ).fetchall()
    out = []
    for dead_id, message_id, queue_name, reason, created, head, size in rows:
        task, task_id, preview = _task_of(head)
        out.append(
            {
                "id": dead_id,
                "message_id": message_id,
                "queue": queue_name,
                "task": task,
                "task_id": task_id,
                "reason": reason,
                "size": size,
                "dead_at": created.isoformat(),
                "preview": preview,
            }
        )
    return out


def _task_of(head: str) -> tuple[str | None, str | None, str]:
    """The task name and id of a stored message (its first 2,000 characters),
    and a short preview: the task's arguments as Celery shows them, or the
    start of the text when it is no Celery message."""
    try:
        headers = json.loads(head).get("headers") or {}
        task, task_id = headers.get("task"), headers.get("id")
        if "argsrepr" in headers or "kwargsrepr" in headers:
            args, kwargs = headers.get("argsrepr"), headers.get("kwargsrepr")
            return task, task_id, f"args {args} kwargs {kwargs}"[:300]
        return task, task_id, head[:300]
    except (ValueError, AttributeError):
        return None, None, head[:300]


def retry_dead_letters(
    conn: psycopg.Connection[Any], stmts: Statements, queue: str | None, ids: list[int] | None
) -> dict[str, int]:
    """Put dead letters back on their queues; returns how many per queue."""
    rows = conn.execute(
        stmts.dead_letters_retry, {**_selection(queue, ids), "prefix": stmts.channel_prefix}
    ).fetchall()
    return {q: int(n) for q, n, _ in rows}


def drop_dead_letters(
    conn: psycopg.Connection[Any], stmts: Statements, queue: str | None, ids: list[int] | None
) -> int:
    row = conn.execute(stmts.dead_letters_drop, _selection(queue, ids)).fetchone()
    return int(row[0]) if row else 0
