"""``--autoscale MAX,MIN``: grow while jobs wait for a child; shrink one idle
child at a time after ``pgnotify_autoscale_keepalive`` seconds without
waiting jobs (Celery's autoscaler keeps 30 s too)."""

from __future__ import annotations

import logging
import time

from celery_pgnotify.worker.pool import Pool

logger = logging.getLogger(__name__)


class Autoscaler:
    def __init__(self, pool: Pool, bounds: tuple[int, int], keepalive: float) -> None:
        self._pool = pool
        self.most, self.least = bounds
        self._keepalive = keepalive
        self._last_busy = time.monotonic()

    def step(self) -> None:
        size = self._pool.settings.concurrency
        waiting = len(self._pool.queued())
        now = time.monotonic()
        if waiting:
            self._last_busy = now
            if size < self.most:
                logger.info("Autoscale: %d -> %d children", size, min(self.most, size + waiting))
                self._pool.resize(min(self.most, size + waiting))
        elif size > self.least and now - self._last_busy > self._keepalive:
            if len(self._pool.running()) < size:
                logger.info("Autoscale: %d -> %d children", size, size - 1)
                self._pool.resize(size - 1)
                self._last_busy = now
