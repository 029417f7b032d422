"""Tasks ending every way Celery knows, for the semantics parity test.

Each task logs its runs (see :func:`tests.e2e_app.log`) and decides what to
do from how many runs of its tag came before, so a requeued or retried
message ends differently the second time.
"""

from __future__ import annotations

import os
import time

import psycopg
from celery import Celery
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded

from celery_pgnotify import enqueue_in
from tests.e2e_app import LOG_DSN, LOG_TABLE, configure, log

app = configure(Celery("semantics"), results=True)


def runs_before(tag: str) -> int:
    """Runs of ``tag`` logged before this one."""
    with psycopg.connect(LOG_DSN, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT count(*) FROM "{LOG_TABLE}" WHERE tag = %s',  # noqa: S608
            (tag,),
        ).fetchone()
    return int(row[0]) - 1 if row else 0


def _run(tag: str) -> int:
    log(tag, "run")
    return runs_before(tag)


@app.task
def succeed(tag: str) -> str:
    _run(tag)
    return "ok"


@app.task
def fail(tag: str) -> None:
    _run(tag)
    raise ValueError("failed on purpose")


@app.task(acks_late=True)
def fail_late(tag: str) -> None:
    _run(tag)
    raise ValueError("failed on purpose")


@app.task(acks_late=True, acks_on_failure_or_timeout=False)
def fail_late_unacked(tag: str) -> None:
    _run(tag)
    raise ValueError("failed on purpose")


@app.task(bind=True, acks_late=True, max_retries=3)
def retry_now(self, tag: str) -> str:  # type: ignore[no-untyped-def]
    """Retries twice with countdown 0: the retry has the same task id and
    may be claimed before the first run's message is settled."""
    if _run(tag) < 2:
        raise self.retry(countdown=0)
    return "ok"


@app.task(bind=True, max_retries=3)
def retry_later(self, tag: str) -> str:  # type: ignore[no-untyped-def]
    if _run(tag) < 1:
        raise self.retry(countdown=1)
    return "ok"


@app.task(acks_late=True)
def reject_requeue(tag: str) -> str:
    if _run(tag) < 1:
        raise Reject("not now", requeue=True)
    return "ok"


@app.task(acks_late=True)
def reject_drop(tag: str) -> None:
    _run(tag)
    raise Reject("never", requeue=False)


@app.task
def reject_early_acked(tag: str) -> None:
    """Acked when it started: a Reject cannot bring the message back."""
    _run(tag)
    raise Reject("too late", requeue=True)


@app.task
def ignore(tag: str) -> None:
    _run(tag)
    raise Ignore()


@app.task(acks_late=True, time_limit=1)
def hard_limit(tag: str) -> None:
    _run(tag)
    time.sleep(30)


@app.task(soft_time_limit=1)
def soft_limit(tag: str) -> str:
    _run(tag)
    try:
        time.sleep(30)
    except SoftTimeLimitExceeded:
        return "caught"
    return "not interrupted"


@app.task(acks_late=True, reject_on_worker_lost=True)
def lost_requeued(tag: str) -> str:
    if _run(tag) < 1:
        os._exit(1)
    return "ok"


@app.task(acks_late=True)
def lost_late(tag: str) -> None:
    _run(tag)
    os._exit(1)


@app.task(bind=True, max_retries=3)
def retry_in_transaction(self, tag: str) -> str:  # type: ignore[no-untyped-def]
    """``self.retry()`` raised inside the application's own transaction: the
    transaction rolls back, the retry must still be delivered."""
    with psycopg.connect(LOG_DSN) as conn, conn.transaction(), enqueue_in(conn):
        if _run(tag) < 1:
            raise self.retry(countdown=0)
    return "ok"


@app.task
def sleep_for(tag: str, seconds: float) -> None:
    _run(tag)
    time.sleep(seconds)
    log(tag, "done")


if os.environ.get("PGNOTIFY_SEMANTICS_BAD_RATE"):
    # Celery's own worker refuses to start with this; celery-pg worker meets
    # it only when a message of the task arrives.
    @app.task(rate_limit="often")
    def badly_limited(tag: str) -> None:
        _run(tag)


@app.task(time_limit=1)
def hard_limit_early(tag: str) -> None:
    _run(tag)
    time.sleep(30)


@app.task(acks_late=True)
def revoked_while_running(tag: str) -> None:
    _run(tag)
    time.sleep(30)
