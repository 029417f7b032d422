"""What happens to a task's message once the task has ended: Celery's ack rules.

The rules are those of Celery's own worker (``celery/worker/request.py``:
``on_success``, ``on_failure``, ``on_retry``, ``on_timeout``), read from the
task's options, so that a message ends as it would under ``celery worker``:

========================  ===================================================
outcome                   message
========================  ===================================================
success                   acked (``acks_late``: now; else when a child took it)
failure                   ``acks_late``: acked with ``acks_on_failure``
                          (``acks_on_failure_or_timeout``), else rejected
retry                     acked (the retry is a new message)
``Reject(requeue=...)``   requeued, or rejected (dead-lettered here)
``Ignore``                acked
hard time limit           ``acks_late``: acked with ``acks_on_timeout``, else
                          requeued (Celery 5.7+) or rejected (older Celery)
revoked (terminated)      acked
child lost                ``acks_late``: requeued with ``reject_on_worker_lost``,
                          else as a failure; not started yet: requeued
expired                   acked (the task is marked REVOKED)
========================  ===================================================

A message acked early (when a child took it) is never settled again: a
``Reject(requeue=True)`` of a task without ``acks_late`` cannot bring it back,
as in Celery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: What :func:`settle` may answer.
ACK, REQUEUE, REJECT = "ack", "requeue", "reject"

OUTCOMES = frozenset(
    {"success", "failure", "retry", "reject", "ignore", "timeout", "revoked", "lost", "expired"}
)


def _flag(task: Any, name: str, fallback: str) -> bool:
    value = getattr(task, name, None)
    if value is None:
        value = getattr(task, fallback, True)
    return bool(True if value is None else value)


@dataclass(frozen=True)
class AckRules:
    """The ack options of one task, as Celery resolves them."""

    acks_late: bool = False
    acks_on_failure: bool = True
    acks_on_timeout: bool = True
    reject_on_worker_lost: bool = False
    #: Celery 5.7+ requeues an ``acks_late`` task that timed out and is not
    #: acked on timeout; older Celery rejects it.
    timeout_requeues: bool = False

    @classmethod
    def of(cls, task: Any) -> AckRules:
        split = hasattr(task, "acks_on_timeout")  # Celery 5.7+: two settings
        return cls(
            acks_late=bool(task.acks_late),
            acks_on_failure=_flag(task, "acks_on_failure", "acks_on_failure_or_timeout"),
            acks_on_timeout=_flag(task, "acks_on_timeout", "acks_on_failure_or_timeout"),
            reject_on_worker_lost=bool(task.reject_on_worker_lost),
            timeout_requeues=split,
        )


def settle(outcome: str, rules: AckRules, requeue: bool = False, started: bool = True) -> str:
    """What to do with the message of a task that ended with ``outcome``.

    ``requeue``: the ``Reject`` exception's flag; ``started``: whether a
    child had begun the task (for ``lost``). The caller leaves a message
    alone when it was already acked.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown task outcome {outcome!r}")
    if outcome == "reject":
        return REQUEUE if requeue else REJECT
    if outcome == "lost" and not started:
        return REQUEUE
    if not rules.acks_late:
        return ACK
    if outcome == "failure":
        return ACK if rules.acks_on_failure else REJECT
    if outcome == "timeout":
        if rules.acks_on_timeout:
            return ACK
        return REQUEUE if rules.timeout_requeues else REJECT
    if outcome == "lost":
        if rules.reject_on_worker_lost:
            return REQUEUE
        return ACK if rules.acks_on_failure else REJECT
    return ACK
