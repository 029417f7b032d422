"""How long claims take, as each consumer measures them (round trip
included), kept as a histogram and reported with the consumer's heartbeat
for the metrics (``pgnotify_consumer_claim_seconds``), and when a claim last
got messages (the consumer's ``fed_at``, which ``celery-pg status`` shows)."""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

#: Upper bounds, in seconds, of the claim latency buckets; one more bucket
#: above the last holds the rest (+Inf).
CLAIM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ClaimTimes:
    """A consumer's claims since it started: a count per bucket, and their sum."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(CLAIM_BUCKETS) + 1)
        self._total = 0.0
        self._fed: float | None = None  # monotonic time of the last claim that got messages

    def record(self, seconds: float, fed: bool = False) -> None:
        slot = bisect.bisect_left(CLAIM_BUCKETS, seconds)
        with self._lock:
            self._counts[slot] += 1
            self._total += seconds
            if fed:
                self._fed = time.monotonic()

    def report(self) -> dict[str, Any]:
        """What the consumer's heartbeat carries: its claims so far (a count
        per bucket, not cumulative, and their total seconds) and, for the
        server to compare with its own, this host's clock; and how long ago
        a claim last got messages (None: none since it started)."""
        with self._lock:
            counts, total, fed = list(self._counts), self._total, self._fed
        fed_ago = None if fed is None else time.monotonic() - fed
        return {"claims": counts, "claim_seconds": total, "clock": time.time(), "fed_ago": fed_ago}
