"""The Celery project the fault checker's fleet runs (see :mod:`tests.checker`).

Results are stored (so result sessions exist to be faulted), beat fires a
tick every second (so beat sessions and the beat lease exist too), and every
execution is written to a file of its process with the time it ended, so
that counting survives any database fault.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from tests.e2e_app import configure

app = configure(Celery("checker"), results=True)
app.conf.result_expires = None  # no cleanup task in the way
app.conf.pgnotify_beat_retry = 1.0
app.conf.beat_schedule = {"tick": {"task": "tests.checker_app.tick", "schedule": 1.0}}

MARK_DIR = os.environ.get("PGNOTIFY_MARK_DIR", "")


def _append(kind: str, line: str) -> None:
    with open(os.path.join(MARK_DIR, f"{os.getpid()}.{kind}"), "a") as f:
        f.write(line + "\n")


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def mark(self, index: int, seconds: float = 0.0) -> None:  # type: ignore[no-untyped-def]
    """One numbered task of the workload: counted when it ends, with its id
    and whether its message had been delivered before."""
    if seconds:
        time.sleep(seconds)
    again = 1 if (self.request.delivery_info or {}).get("redelivered") else 0
    _append("marks", f"{index} {time.time():.3f} {self.request.id} {again}")


@app.task(ignore_result=True)
def tick() -> None:
    """What beat fires every second."""
    _append("ticks", f"{time.time():.3f}")
