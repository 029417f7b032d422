"""Task messages the manager holds until a time: those with an ETA or a
countdown, and those over their task's ``rate_limit``.

Held messages stay leased and unacked, so the lease keeps them safe however
long they wait. Only ETA ones widen the prefetch window (as in Celery's
worker): rate-limited ones wait inside it.
"""

from __future__ import annotations

import heapq
import itertools
from datetime import datetime, timezone
from typing import Any

from celery.utils.time import rate
from kombu.message import Message
from kombu.utils.limits import TokenBucket


class Holding:
    """A time-ordered heap of held messages, and the token buckets of rate limits."""

    def __init__(self, app: Any) -> None:
        # Read once, as Celery's own worker does at start.
        self._no_rate_limits = bool(app.conf.worker_disable_rate_limits)
        self._default_rate = app.conf.task_default_rate_limit
        #: (when, seq, message, is_eta), earliest first
        self._heap: list[tuple[float, int, Message, bool]] = []
        self._seq = itertools.count()
        #: how many held messages have an ETA (kept, not counted: O(1) per message)
        self.eta_count = 0
        self._buckets: dict[str, TokenBucket | None] = {}  # task name -> rate limit

    def __len__(self) -> int:
        return len(self._heap)

    def hold(self, when: float, message: Message, is_eta: bool) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), message, is_eta))
        if is_eta:
            self.eta_count += 1

    def due(self, now: float) -> list[tuple[Message, bool]]:
        """Take out the messages due at ``now``: (message, is_eta) each."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, _, message, is_eta = heapq.heappop(self._heap)
            if is_eta:
                self.eta_count -= 1
            out.append((message, is_eta))
        return out

    def next_at(self) -> float | None:
        """When the earliest held message is due (UNIX time; None: none held)."""
        return self._heap[0][0] if self._heap else None

    def messages(self) -> list[Message]:
        return [message for _, _, message, _ in self._heap]

    def clear(self) -> list[Message]:
        """Let go of every held message; returns them."""
        held = self.messages()
        self._heap.clear()
        self.eta_count = 0
        return held

    def rate_wait(self, task: Any) -> float:
        """Seconds to wait for ``task``'s rate_limit (0: go now, token taken)."""
        if self._no_rate_limits:
            return 0.0
        if task.name not in self._buckets:
            limit = rate(task.rate_limit or self._default_rate)
            self._buckets[task.name] = TokenBucket(limit, capacity=1) if limit else None
        bucket = self._buckets[task.name]
        if bucket is None or bucket.can_consume(1):
            return 0.0
        return max(float(bucket.expected_time(1)), 0.001)

    def reset_rate_limit(self, task_name: str) -> None:
        """Forget ``task_name``'s token bucket: its (new) rate_limit applies next."""
        self._buckets.pop(task_name, None)

    def scheduled(self, hostname: str) -> list[dict[str, Any]]:
        """``celery inspect scheduled``'s answer, earliest first."""
        out = []
        for eta, _, message, _ in sorted(self._heap, key=lambda held: held[:2]):
            headers = message.headers or {}
            out.append(
                {
                    "eta": datetime.fromtimestamp(eta, timezone.utc).isoformat(),
                    "priority": message.properties.get("priority"),
                    "request": {
                        "id": headers.get("id"),
                        "name": headers.get("task"),
                        "args": headers.get("argsrepr"),
                        "kwargs": headers.get("kwargsrepr"),
                        "hostname": hostname,
                    },
                }
            )
        return out
