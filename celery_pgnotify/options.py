"""Every setting of celery-pgnotify, declared once: its default, its meaning,
its validation.

- :class:`TransportOptions`: ``broker_transport_options`` (and kombu's
  ``Connection(transport_options=...)``); the result backend reads the same
  from ``result_backend_transport_options``.
- :class:`AppSettings`: celery-pgnotify's own Celery settings,
  ``app.conf.pgnotify_*``.

A wrong type or value raises :class:`~celery_pgnotify.errors.ConfigurationError`
naming the setting. The README's tables are :func:`markdown_table` of these
declarations (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from celery_pgnotify.errors import ConfigurationError
from celery_pgnotify.statements import SCHEMA_NAME

#: Seconds before its ETA a scheduled task is moved to its queue: the worker
#: holds it for at most this long, and its start never waits on the move.
PROMOTE_AHEAD = 1.0


def _setting(default: Any, shown: str, meaning: str) -> Any:
    """A declared setting: its default, the default as the README shows it,
    and what it means."""
    return dataclasses.field(default=default, metadata={"shown": shown, "meaning": meaning})


@dataclasses.dataclass(frozen=True)
class TransportOptions:
    """Validated transport options."""

    schema: str = _setting("celery_pgnotify", "`celery_pgnotify`", "schema holding the tables")
    dsn: str | None = _setting(None, "from the URL", "a full libpq DSN/URI used instead of the URL")
    priority_order: str = _setting(
        "desc", "`desc`", "`desc`: 9 first (RabbitMQ); `asc`: 0 first (Redis)"
    )
    heartbeat_interval: float = _setting(2.0, "2.0 s", "how often a consumer proves it is alive")
    lease_timeout: float = _setting(
        8.0,
        "8.0 s",
        "a consumer silent this long is dead, whatever its lock says (one whose "
        "session is gone is dead after `2 x heartbeat_interval` already)",
    )
    polling_interval: float = _setting(
        5.0, "5.0 s", "fallback re-read of the tables (lost notifications)"
    )
    claim_batch: int = _setting(
        100, "100", "most messages claimed by one statement (also bounded by prefetch)"
    )
    auto_migrate: bool = _setting(True, "true", "create/upgrade the schema on first connect")
    connect_timeout: float = _setting(
        10.0, "10 s", "libpq `connect_timeout`, unless the URL sets one"
    )
    reconnect_max_delay: float = _setting(
        5.0, "5.0 s", "ceiling of the LISTEN session's reconnect backoff"
    )
    max_message_size: int = _setting(
        64 * 1024 * 1024,
        "64 MiB",
        "largest stored message: publishing a larger one raises `MessageTooLarge`; "
        "a larger one found in the table is dead-lettered",
    )
    dead_letter_rejected: bool = _setting(
        True,
        "true",
        "a message rejected without requeue goes to `dead_letters` with its reason "
        "instead of vanishing (RabbitMQ's dead-letter exchange, built in)",
    )
    async_acks: bool = _setting(
        True,
        "true",
        "claims, acks and requeues commit without waiting for the WAL flush (see "
        "*Durability*); false: they wait like every other statement",
    )
    durable_publish: bool = _setting(
        True,
        "true",
        "a publish returns once its COMMIT is flushed to the WAL; false: without "
        "waiting for the flush, faster, and a server crash may lose the messages "
        "published in its last `3 x wal_writer_delay` (see *Durability*)",
    )
    broker_etas: bool = _setting(
        True,
        "true",
        "a task whose ETA (`countdown`, `eta`) lies more than `broker_eta_threshold` "
        "ahead waits in the database, not in a worker's memory, until due (see "
        "*Scheduled tasks*); false: workers hold it, as on other brokers",
    )
    broker_eta_threshold: float = _setting(
        10.0,
        "10 s",
        "how far ahead an ETA must lie to wait in the database; at least "
        "`2 x heartbeat_interval + 1` s",
    )

    @property
    def fresh(self) -> float:
        """How recent a consumer's heartbeat must be for a publish to wake it
        alone (an older one may be gone: see ``fragments.wake``)."""
        return 1.5 * self.heartbeat_interval

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
                "(letters, digits and _, at most 63, not starting with a digit, nor with pg_,"
                " which PostgreSQL keeps for itself)",
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
        if self.broker_eta_threshold < 2 * self.heartbeat_interval + PROMOTE_AHEAD:
            # A consumer learns of a new scheduled task at its next heartbeat:
            # one due sooner could be promoted late.
            raise ConfigurationError(
                f"{setting}['broker_eta_threshold']",
                f"must be at least 2 x heartbeat_interval + {PROMOTE_AHEAD:g} s "
                f"({2 * self.heartbeat_interval + PROMOTE_AHEAD:g})",
            )


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """celery-pgnotify's own Celery settings: ``app.conf.pgnotify_<name>``."""

    beat_retry: float = _setting(
        1.0,
        "1.0 s",
        "the beat lease: the leader renews it, and one that stops renewing is "
        "replaced within twice that",
    )
    cancel_grace: float = _setting(
        5.0,
        "5.0 s",
        "`celery-pg worker`: from SIGUSR1 to SIGKILL for a cancelled task (hard time "
        "limit, revoke with terminate)",
    )
    autoscale_keepalive: float = _setting(
        30.0,
        "30 s",
        "`celery-pg worker --autoscale`: an idle child goes after this long without waiting work",
    )
    max_lifetime_per_child: float = _setting(
        0.0,
        "0 (none)",
        "`celery-pg worker`: seconds after which a child is replaced once its task "
        "ends (`--max-lifetime-per-child` overrides it)",
    )

    @classmethod
    def from_conf(cls, conf: Any) -> AppSettings:
        """Read and validate every ``pgnotify_*`` setting of a Celery app's conf."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = conf.get(f"pgnotify_{f.name}")
            if value is not None:
                values[f.name] = _coerce(f"pgnotify_{f.name}", value, f.default)
        settings = cls(**values)
        if settings.beat_retry <= 0:
            raise ConfigurationError("pgnotify_beat_retry", "must be a positive number")
        for f in dataclasses.fields(cls):
            if getattr(settings, f.name) < 0:
                raise ConfigurationError(f"pgnotify_{f.name}", "must not be negative")
        return settings


def markdown_table(declaration: Any, prefix: str = "") -> str:
    """The README's table of the settings of ``declaration`` (a class above)."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(declaration):
        rows.append(f"| `{prefix}{f.name}` | {f.metadata['shown']} | {f.metadata['meaning']} |")
    return "\n".join(rows) + "\n"


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
