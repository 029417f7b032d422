"""What ``celery-pg worker`` asks of its broker beyond kombu's interface.

The manager consumes through any kombu connection. On ``pgnotify://`` the
transport offers more: a consumer that survives a lost connection with its
leases (park, then resume and reconcile), a liveness verdict, acks batched
into the next claim, and a way to wake the blocked event loop. This module
names that contract once (:class:`Broker`) and gives every other transport a
plain stand-in, so the manager never probes for attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from celery_pgnotify.transport import Transport


class Broker(Protocol):
    """The transport's side of delivery, acks and connection handover."""

    @property
    def resumed(self) -> bool:
        """This connection carries on a parked consumer, its leases intact."""

    def park(self) -> None:
        """The connection is lost, not closed: keep the consumer's leases
        for the process's next connection."""

    def reconcile(self, held: Iterable[int]) -> int:
        """Give back what is leased to this consumer but not in ``held``;
        returns how many went back."""

    def alive_for_sure(self) -> bool:
        """False while the consumer may have been declared dead (a stall, a
        freeze, a partition): nothing new should start."""

    def batched_acks(self, write: bool = True) -> AbstractContextManager[None]:
        """Acks made inside the block leave together."""

    def wakeup(self) -> None:
        """Make a blocked ``drain_events`` return (thread-safe)."""

    def scheduled(self, hostname: str) -> list[dict[str, Any]]:
        """Tasks waiting in the broker until due, in ``inspect scheduled``'s format."""


class Plain:
    """Any other kombu transport: no handover, acks one by one, always alive,
    and the event loop wakes by its own timeout."""

    resumed = False

    def park(self) -> None:
        pass

    def reconcile(self, held: Iterable[int]) -> int:
        return 0

    def alive_for_sure(self) -> bool:
        return True

    @contextlib.contextmanager
    def batched_acks(self, write: bool = True) -> Iterator[None]:
        yield

    def wakeup(self) -> None:
        pass

    def scheduled(self, hostname: str) -> list[dict[str, Any]]:
        return []


PLAIN = Plain()


def broker_of(connection: Any) -> Broker:
    """The :class:`Broker` behind a kombu connection (``None``: no
    connection yet, the plain stand-in)."""
    transport = None if connection is None else connection.transport
    if isinstance(transport, Transport):
        return transport
    return PLAIN
