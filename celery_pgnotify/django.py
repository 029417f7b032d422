"""Django integration of transactional enqueue.

Tasks sent inside ``transaction.atomic()`` can be written in that very
transaction, so they commit or roll back with the rows they are about::

    # once, e.g. in the module that creates the Celery app
    from celery_pgnotify.django import enqueue_in_atomic_blocks
    enqueue_in_atomic_blocks()

    # then, anywhere
    with transaction.atomic():
        order = Order.objects.create(...)
        send_receipt.delay(order.pk)   # rolled back with the order, or delivered after COMMIT

Or explicitly, for one block: ``with enqueue_in_django(): task.delay()``.

The rule: it applies to the pgnotify broker when the Django database
(``using``, ``"default"`` by default) is the broker's database and Django
runs on psycopg 3 (Django 4.2+ with ``psycopg`` installed). Outside an
atomic block, publishing is unchanged. Unlike ``transaction.on_commit``,
nothing is lost if the process dies between COMMIT and the publish: there is
no such moment. Django's ``TestCase`` wraps each test in a transaction that is
rolled back, and the tasks sent inside it with it: tests that need a real
worker to run them use ``TransactionTestCase``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import psycopg

from celery_pgnotify.enqueue import add_provider, enqueue_in


def _psycopg_connection(using: str) -> psycopg.Connection[Any]:
    from django.db import connections

    wrapper = connections[using]
    wrapper.ensure_connection()
    raw = wrapper.connection
    if not isinstance(raw, psycopg.Connection):
        raise TypeError(
            f"Django database {using!r} is not PostgreSQL on psycopg 3 "
            f"(its connection is {type(raw).__module__}.{type(raw).__name__}); "
            "transactional enqueue needs Django 4.2+ with psycopg installed"
        )
    return raw


def enqueue_in_django(using: str = "default") -> AbstractContextManager[psycopg.Connection[Any]]:
    """Publish the tasks sent inside the block through Django's connection ``using``."""
    return enqueue_in(_psycopg_connection(using))


_installed: set[str] = set()


def enqueue_in_atomic_blocks(using: str = "default") -> None:
    """From now on, tasks sent inside ``transaction.atomic()`` on ``using``
    are written in that transaction (see the module docstring for the rule)."""
    if using in _installed:
        return
    _installed.add(using)

    def provider() -> psycopg.Connection[Any] | None:
        from django.db import connections

        wrapper = connections[using]
        if not wrapper.in_atomic_block:
            return None
        return _psycopg_connection(using)

    add_provider(provider)
