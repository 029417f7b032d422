"""A wake-up pipe: one thread makes it readable, another waits on it.

Every blocking wait here (the consumer's event loop, the LISTEN thread, a
``.get()`` on a result, the worker pool's results thread) watches a
descriptor; another thread wakes it by writing a byte. Both ends are
non-blocking, and a pipe is closed once: after :meth:`WakePipe.close` every
call touches nothing, since a closed descriptor's number soon belongs to
another file.
"""

from __future__ import annotations

import os
import threading


class WakePipe:
    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()

    @property
    def fd(self) -> int:
        """The end to wait on (-1 once closed)."""
        return self._r

    def poke(self) -> None:
        """Make :attr:`fd` readable (thread-safe)."""
        fd = self._w
        if fd >= 0:
            try:
                os.write(fd, b"x")
            except (BlockingIOError, OSError):
                pass  # full already: readable anyway

    def drain(self) -> None:
        """Read every wake-up written so far."""
        fd = self._r
        if fd >= 0:
            try:
                while os.read(fd, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def close(self) -> None:
        with self._lock:
            fds, self._r, self._w = (self._r, self._w), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
