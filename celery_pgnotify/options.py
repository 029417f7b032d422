"""Transport options: every tunable, its default and the reason for it.

Set them with Celery's ``broker_transport_options`` (or kombu's
``Connection(transport_options=...)``). A wrong type or value raises
:class:`~celery_pgnotify.errors.ConfigurationError` naming the option.

==========================  ===========  =============================================
option                      default      meaning
==========================  ===========  =============================================
``schema``                  celery_pgnotify  PostgreSQL schema holding the tables.
``dsn``                     (from URL)   A full libpq DSN/URI used instead of the URL.
``priority_order``          ``desc``     ``desc``: priority 9 first (RabbitMQ);
                                         ``asc``: 0 first (kombu's Redis transport).
``heartbeat_interval``      2.0 s        How often a consumer proves it is alive.
``lease_timeout``           8.0 s        A consumer silent this long is dead and its
                                         messages return to their queues. A consumer
                                         whose database session is gone is dead after
                                         ``2 * heartbeat_interval`` already.
``polling_interval``        5.0 s        Fallback re-read of the tables, in case a
                                         notification was lost. Not on the hot path.
``claim_batch``             100          Most messages claimed in one statement (also
                                         bounded by the consumer's prefetch count).
``auto_migrate``            True         Create/upgrade the schema on first connect.
``connect_timeout``         10 s         libpq ``connect_timeout`` unless the DSN has one.
``reconnect_max_delay``     5.0 s        Ceiling of the listener's reconnect backoff.
``max_message_size``        64 MiB       Largest stored message (JSON text, body
                                         included). Publishing a larger one raises
                                         MessageTooLarge; a larger one found in the
                                         table (written by SQL) is dead-lettered.
``dead_letter_rejected``    True         A message rejected without requeue (an
                                         unregistered task, ``Reject(requeue=False)``)
                                         goes to ``dead_letters`` with its reason
                                         instead of vanishing (RabbitMQ's DLX, built in).
``async_acks``              True         Claims, acks and requeues commit without
                                         waiting for the WAL flush (``synchronous_commit
                                         = off`` for those statements only). A server
                                         crash can undo the last of them (at most
                                         3 x ``wal_writer_delay``); an undone claim or
                                         ack only delivers a message again, never loses
                                         one. Publishes always commit as the server is
                                         configured. False: every statement waits.
==========================  ===========  =============================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from celery_pgnotify.errors import ConfigurationError
from celery_pgnotify.statements import SCHEMA_NAME


@dataclasses.dataclass(frozen=True)
class TransportOptions:
    """Validated transport options (see the module docstring for each)."""

    schema: str = "celery_pgnotify"
    dsn: str | None = None
    priority_order: str = "desc"
    heartbeat_interval: float = 2.0
    lease_timeout: float = 8.0
    polling_interval: float = 5.0
    claim_batch: int = 100
    auto_migrate: bool = True
    connect_timeout: float = 10.0
    reconnect_max_delay: float = 5.0
    max_message_size: int = 64 * 1024 * 1024
    dead_letter_rejected: bool = True
    async_acks: bool = True

    @property
    def lock_grace(self) -> float:
        """How long a consumer may lack its session lock before it is dead."""
        return 2 * self.heartbeat_interval

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], setting: str = "broker_transport_options"
    ) -> TransportOptions:
        """Build from ``transport_options``, ignoring options kombu/Celery own.

        ``setting`` is the name errors give the mapping (the result backend
        reads ``result_backend_transport_options``).
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name in fields:
                values[name] = _coerce(f"{setting}[{name!r}]", value, fields[name].default)
        opts = cls(**values)
        opts._validate(setting)
        return opts

    def _validate(self, setting: str) -> None:
        if not SCHEMA_NAME.match(self.schema):
            raise ConfigurationError(
                f"{setting}['schema']",
                f"{self.schema!r} is not a plain SQL identifier "
                "(letters, digits and _, at most 63, not starting with a digit)",
            )
        if self.priority_order not in ("desc", "asc"):
            raise ConfigurationError(
                f"{setting}['priority_order']",
                f"must be 'desc' (9 first, as RabbitMQ) or 'asc' (0 first, as Redis), "
                f"not {self.priority_order!r}",
            )
        for name in (
            "heartbeat_interval",
            "lease_timeout",
            "polling_interval",
            "connect_timeout",
            "reconnect_max_delay",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{setting}[{name!r}]", "must be a positive number")
        if self.lease_timeout < 2 * self.heartbeat_interval:
            raise ConfigurationError(
                f"{setting}['lease_timeout']",
                f"must be at least twice heartbeat_interval ({self.heartbeat_interval})",
            )
        if self.max_message_size < 1024:
            raise ConfigurationError(
                f"{setting}['max_message_size']", "must be at least 1024 bytes"
            )
        if self.claim_batch < 1:
            raise ConfigurationError(f"{setting}['claim_batch']", "must be at least 1")


def _coerce(setting: str, value: Any, default: Any) -> Any:
    if default is None or isinstance(default, str):
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(setting, f"must be a string, not {type(value).__name__}")
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigurationError(setting, f"must be a boolean, not {value!r}")
    kind = type(default)
    try:
        if isinstance(value, bool):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            setting, f"must be {'an integer' if kind is int else 'a number'}, not {value!r}"
        ) from None
