"""The project's exception hierarchy: one root, meaningful subclasses."""

from __future__ import annotations

from kombu.exceptions import ChannelError


class PgNotifyError(Exception):
    """Root of every error raised by celery-pgnotify."""


class ConfigurationError(PgNotifyError, ValueError):
    """A setting or transport option has a bad value; the message names it."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")


class SchemaError(PgNotifyError):
    """The database schema is missing, too new, or could not be migrated."""


class DatabaseUnavailable(PgNotifyError, ConnectionError):
    """PostgreSQL could not be reached (raised where no psycopg error fits)."""


class InvalidName(PgNotifyError, ValueError):
    """A queue or exchange name cannot be stored (empty, too long, NUL byte)."""


class MessageTooLarge(PgNotifyError, ValueError):
    """A message is larger than the ``max_message_size`` transport option."""


class PreconditionFailed(PgNotifyError, ChannelError):  # type: ignore[misc]
    """A queue was declared again with settings other than its own (as
    RabbitMQ's 406 PRECONDITION_FAILED): nothing was changed."""
