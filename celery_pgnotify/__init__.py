"""Celery on PostgreSQL alone.

Importing this package is cheap: it does not import kombu, Celery or psycopg.
The ``pgnotify://`` URL scheme is registered with kombu automatically at
interpreter start-up by the ``celery_pgnotify.pth`` file the wheel installs;
:func:`register` does the same explicitly for environments that skip ``.pth``
files (``python -S``, some frozen applications).
"""

from __future__ import annotations

from celery_pgnotify.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    PgNotifyError,
    SchemaError,
)

__version__ = "0.1.0"

#: The URL scheme users put in ``broker_url``.
SCHEME = "pgnotify"
#: Where kombu finds the transport class.
TRANSPORT_PATH = "celery_pgnotify.transport:Transport"

__all__ = [
    "enqueue_in",
    "pause_queue",
    "resume_queue",
    "SCHEME",
    "TRANSPORT_PATH",
    "ConfigurationError",
    "DatabaseUnavailable",
    "PgNotifyError",
    "SchemaError",
    "register",
]


def register() -> None:
    """Register the ``pgnotify`` scheme in kombu's transport alias table."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES.setdefault(SCHEME, TRANSPORT_PATH)


def __getattr__(name: str) -> object:
    # enqueue_in imports psycopg: loaded on first use, keeping this import cheap.
    if name == "enqueue_in":
        from celery_pgnotify.enqueue import enqueue_in

        return enqueue_in
    if name in ("pause_queue", "resume_queue"):
        from celery_pgnotify import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'celery_pgnotify' has no attribute {name!r}")
