"""How long claims take, as each consumer measures them (round trip
included), kept as a histogram and reported with the consumer's heartbeat
for the metrics (``pgnotify_consumer_claim_seconds``)."""

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

    def record(self, seconds: float) -> None:
        slot = bisect.bisect_left(CLAIM_BUCKETS, seconds)
        with self._lock:
            self._counts[slot] += 1
            self._total += seconds

    def report(self) -> dict[str, Any]:
        """What the consumer's heartbeat carries: its claims so far (a count
        per bucket, not cumulative, and their total seconds) and, for the
        server to compare with its own, this host's clock."""
        with self._lock:
            counts, total = list(self._counts), self._total
        return {"claims": counts, "claim_seconds": total, "clock": time.time()}
