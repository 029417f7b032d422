"""Where is my task? (``celery-pg explain TASK_ID``).

One statement reads everything the tables know of a task (its messages,
its scheduled row, a recorded revoke, dead letters, its result) in one
snapshot; :func:`explain` turns that into one line a person can act on,
and the facts behind it for scripts.

The answer, by what holds first:

- ``expired``: on a queue past its queue's message TTL: deleted, never run;
- ``waiting``: on queue Q behind N others (or Q is paused, or nobody reads it);
- ``delayed``: taken by a worker that holds it until its ETA;
- ``leased``: taken by a worker (host/pid) since T, alive or presumed dead;
- ``scheduled``: waits in ``scheduled`` until T;
- ``dead_letter``: dead-lettered with its reason;
- ``finished``/``started``/``retry``...: the state its result records
  (when results are kept in the same database and schema);
- ``revoked``: revoked, and on no queue;
- ``unknown``: never seen, or gone without a trace (acked, no result kept).

A live revoke, or a Celery ``expires`` time passed, is added to whichever
answer holds: the worker discards the task.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg

from celery_pgnotify.statements import Statements

#: Result states Celery stores before a task's end.
_UNFINISHED = frozenset({"PENDING", "RECEIVED", "STARTED", "RETRY"})


def explain(conn: psycopg.Connection[Any], stmts: Statements, task_id: str) -> dict[str, Any]:
    """What the tables know of ``task_id``: ``{"task_id", "state", "summary",
    "messages", "scheduled", "revoked", "dead_letters", "result"}``."""
    row = conn.execute(stmts.explain, {"id": task_id, "ns": stmts.lock_namespace}).fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    now, messages, scheduled, revoked, dead, result = row
    facts = {
        "messages": messages,
        "scheduled": scheduled,
        "revoked": revoked,
        "dead_letters": dead,
        "result": result,
    }
    state, summary = _answer(now, facts)
    expires = messages[0]["expires"] if messages else None
    if expires and state in ("waiting", "delayed", "leased") and not _later(expires, now):
        summary += f"; its expires time {expires} has passed: a worker discards it as REVOKED"
    if revoked and revoked["live"] and state != "revoked":
        summary += f"; revoked at {_when(revoked['revoked_at'])}: a worker discards it"
    return {"task_id": task_id, "state": state, "summary": summary, **facts}


def _answer(now: datetime, facts: dict[str, Any]) -> tuple[str, str]:
    if facts["messages"]:
        return _on_queue(now, facts["messages"][0])
    if facts["scheduled"]:
        return _scheduled(facts["scheduled"][0])
    if facts["dead_letters"]:
        dead = facts["dead_letters"][-1]
        return "dead_letter", (
            f"dead-lettered from queue {dead['queue']!r} at {_when(dead['dead_at'])}: "
            f"{dead['reason']} (dead letter {dead['id']}; `celery-pg dead-letters retry "
            f"{dead['id']}` puts it back)"
        )
    result = facts["result"]
    if result and result["stored"]:
        return _finished(result)
    revoked = facts["revoked"]
    if revoked:
        live = "still in force" if revoked["live"] else "since expired"
        return "revoked", (
            f"revoked at {_when(revoked['revoked_at'])} ({live}) and on no queue: "
            "it was discarded, or never published"
        )
    summary = (
        "never seen: on no queue, not scheduled, not dead-lettered, no result in this "
        "database (or its result expired), never revoked"
    )
    if result and result["waited"]:
        summary += "; a caller waits for its result"
    return "unknown", summary


def _on_queue(now: datetime, m: dict[str, Any]) -> tuple[str, str]:
    queue = repr(m["queue"])
    if m["expired"]:
        return "expired", (
            f"expired on queue {queue} at {_when(m['expires_at'])} (the queue's message TTL): "
            "it is deleted, never run"
        )
    if m["consumer_id"] is None:
        waited = _seconds(now, m["created_at"])
        line = (
            f"waiting on queue {queue} behind {m['ahead']} other(s) (priority {m['priority']}), "
            f"for {waited}"
        )
        if m["paused"]:
            line += f"; {queue} is paused: `celery-pg resume {m['queue']}`"
        elif not m["consumers"]:
            line += f"; no worker consumes {queue}"
        if m["redelivered"]:
            line += "; delivered before, to a worker that did not finish it"
        return "waiting", line
    holder = _holder(m)
    since = f"since {_when(m['leased_at'])} ({_seconds(now, m['leased_at'])})"
    if m["eta"] and _later(m["eta"], now):
        return "delayed", f"held by {holder} {since} until its ETA {m['eta']}"
    return "leased", f"taken by {holder} {since}"


def _holder(m: dict[str, Any]) -> str:
    if m["hostname"] is None:
        return (
            f"consumer {m['consumer_id']}, which is gone: the reaper puts the message back "
            "on its queue"
        )
    who = f"{m['hostname']} pid {m['pid']} (consumer {m['consumer_id']})"
    if m["alive"]:
        return f"{who}, alive"
    return (
        f"{who}, presumed dead (its session is gone, heartbeat "
        f"{m['heartbeat_s']:.0f} s ago): the reaper puts the message back"
    )


def _scheduled(t: dict[str, Any]) -> tuple[str, str]:
    due_in = float(t["due_in_s"])
    when = f"in {due_in:.0f} s" if due_in >= 0 else f"{-due_in:.0f} s ago"
    line = (
        f"scheduled for {_when(t['due_at'])} ({when}) on queue {t['queue']!r} "
        f"(priority {t['priority']})"
    )
    if due_in < 0 and not t["consumers"]:
        line += f"; due, but no worker consumes {t['queue']!r} to move it to the queue"
    elif t["paused"]:
        line += f"; {t['queue']!r} is paused"
    return "scheduled", line


def _finished(result: dict[str, Any]) -> tuple[str, str]:
    status = str(result["status"])
    where = f" on {result['worker']}" if result["worker"] else ""
    at = f" at {_when(result['date_done'])}" if result["date_done"] else ""
    if status in _UNFINISHED:
        line = f"{status} (its result says){where}{at}, and its message is on no queue"
        if status == "STARTED":
            line += ": running, its message acknowledged at start (acks_late is off)"
        return status.lower(), line
    line = f"finished: {status}{where}{at}"
    if status == "FAILURE" and result["error"]:
        line += f": {result['error']}"
    return "finished", line


def _when(value: Any) -> str:
    text = str(value)
    try:
        return datetime.fromisoformat(text).isoformat(sep=" ", timespec="seconds")
    except ValueError:
        return text


def _seconds(now: datetime, then: Any) -> str:
    try:
        seconds = (now - datetime.fromisoformat(str(then))).total_seconds()
    except (TypeError, ValueError):
        return "?"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _later(text: str, now: datetime) -> bool:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return False
    if when.tzinfo is None:
        return when > now.astimezone(timezone.utc).replace(tzinfo=None)  # Celery's UTC
    return when > now
