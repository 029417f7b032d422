"""What the parts of ``celery-pg worker``'s main process share, and what
remote control may read of it.

The :class:`Ledger` is the one record of the jobs the manager holds, keyed by
delivery tag; intake writes it, settling and control read it.
:class:`WorkerState` is all the remote control handlers see of the manager
(``control.py`` depends on this protocol, never on the manager).
"""

from __future__ import annotations

import collections
import time
from typing import Any, Protocol

from celery.utils.collections import LimitedSet
from celery.worker import state as celery_state
from kombu.message import Message

from celery_pgnotify.worker.holding import Holding
from celery_pgnotify.worker.pool import Pool


class Ledger:
    """The jobs given to the pool, the ids revoked, the tasks finished."""

    def __init__(self) -> None:
        #: delivery tag -> (message, task) of every job given to the pool
        self.inflight: dict[int, tuple[Message, Any]] = {}
        #: ids revoked: Celery's own bounded, expiring set of the process,
        #: where broadcasts land and the transport adds the revokes recorded
        #: while this worker was not there (see revoking.py)
        self.revoked: LimitedSet = celery_state.revoked
        #: task name -> tasks finished (``inspect stats``' "total")
        self.total: collections.Counter[str] = collections.Counter()
        self.born = time.time()

    def processed(self) -> int:
        return sum(self.total.values())


class WorkerState(Protocol):
    """The manager as the remote control handlers see it."""

    app: Any
    hostname: str
    pool: Pool
    prefetch_count: int
    ledger: Ledger
    holding: Holding

    def revoke(self, task_id: str, terminate: bool = False) -> None: ...

    def request_stop(self, reason: str) -> None: ...

    def reset_rate_limit(self, task_name: str) -> None: ...

    def pause_queue(self, queue: Any, paused: bool) -> dict[str, str]:
        """Pause or resume a queue for every worker; a control reply."""
        ...

    def held_by_broker(self) -> list[dict[str, Any]]:
        """Scheduled tasks waiting in the broker until due (inspect's format)."""
        ...
