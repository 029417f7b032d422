"""Many publishes, one statement: a group's tasks, and an ``enqueue_in`` block's.

A ``group`` (and so a chord's header, ``chunks``, ``starmap``...) publishes
its tasks one by one through one producer. On a pgnotify channel they are
gathered instead and stored by one statement in one transaction when the
group's publishing ends (``publish_many``): one commit and one NOTIFY per
queue for the whole group, not one per task. ``group.apply_async()`` returns
once they are committed, as before; a failure raises from it, and stores
none of the group's messages. Celery's ``group._apply_tasks`` (how every group
publishes) is wrapped once, when the transport is first loaded; for other
brokers it runs as it is.

Inside an ``enqueue_in(conn)`` block messages are not gathered: each goes
into the caller's transaction as it is published (see ``enqueue.py``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

logger = logging.getLogger(__name__)


class PublishBatch:
    """Messages gathered for one ``publish_many`` statement."""

    def __init__(self) -> None:
        self.depth = 0  # groups nested in groups publish with the outermost
        self.exchanges: list[str] = []
        self.rks: list[str] = []
        self.ranks: list[int] = []
        self.payloads: list[str] = []
        self.ttls: list[int | None] = []
        self.task_ids: list[str | None] = []
        self.dues: list[datetime | None] = []

    def __len__(self) -> int:
        return len(self.payloads)

    def add(self, exchange: str, routing_key: str, params: dict[str, Any]) -> None:
        self.exchanges.append(exchange)
        self.rks.append(routing_key)
        self.ranks.append(params["rank"])
        self.payloads.append(params["payload"])
        self.ttls.append(params["ttl"])
        self.task_ids.append(params["task_id"])
        self.dues.append(params.get("due"))

    def params(self, prefix: str) -> dict[str, Any]:
        return {
            "exchanges": self.exchanges,
            "rks": self.rks,
            "ranks": self.ranks,
            "payloads": self.payloads,
            "ttls": self.ttls,
            "task_ids": self.task_ids,
            "dues": self.dues,
            "prefix": prefix,
        }


@contextmanager
def gathering(channel: Any) -> Iterator[None]:
    """Gather what ``channel`` publishes in the block; store it at the end
    of the outermost block (also when the block raises: what was published
    before the error stays published, as without gathering)."""
    batch = channel._batch
    if batch is None:
        batch = channel._batch = PublishBatch()
    batch.depth += 1
    try:
        yield
    finally:
        batch.depth -= 1
        if batch.depth == 0:
            channel._batch = None
            if len(batch):
                channel._publish_many(batch)


def _gathered(apply_tasks: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(apply_tasks)
    def apply_tasks_gathered(
        self: Any, tasks: Any, producer: Any = None, app: Any = None, *args: Any, **kwargs: Any
    ) -> Iterator[Any]:
        app = app or self.app
        with app.producer_or_acquire(producer) as producer:
            if not hasattr(producer.channel, "_publish_many"):  # another broker
                yield from apply_tasks(self, tasks, producer, app, *args, **kwargs)
                return
            with gathering(producer.channel):
                results = list(apply_tasks(self, tasks, producer, app, *args, **kwargs))
            yield from results

    apply_tasks_gathered.__pgnotify_gathered__ = True  # type: ignore[attr-defined]
    return apply_tasks_gathered


def gather_groups() -> None:
    """Wrap Celery's ``group._apply_tasks`` (once) so that a group's
    messages are published by one statement on a pgnotify channel."""
    from celery.canvas import group

    current = getattr(group, "_apply_tasks", None)
    if current is None or getattr(current, "__pgnotify_gathered__", False):
        return
    group._apply_tasks = _gathered(current)
