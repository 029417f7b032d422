"""Every SQL statement the project runs, in one typed catalogue.

:class:`Statements` names each statement as an attribute whose default is
its template, with ``{s}`` standing for the quoted schema name;
:func:`statements` renders them once per schema. Values are always bound
parameters; queue and exchange names are data, never SQL. The schema itself
and its migrations are the ``.sql`` files of ``schema/`` (``migrations.py``).

By room: ``broker.py`` (publishing and topology, consumers, operations),
``floors.py`` (the queues' floors), ``results.py`` (the result backend and
beat), ``observing.py`` (``explain``,
``check`` and the metrics), ``fragments.py`` (the pieces of SQL they share).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, fields
from typing import Any

from celery_pgnotify.statements.broker import (
    ConsumerStatements,
    ConsumerWrites,
    OperationStatements,
    Publishes,
    TopologyStatements,
)
from celery_pgnotify.statements.floors import FloorStatements
from celery_pgnotify.statements.fragments import CLAIMING_SESSION, DURABLE, NO_FLUSH
from celery_pgnotify.statements.observing import ObservingStatements
from celery_pgnotify.statements.results import BeatStatements, ResultStatements

__all__ = [
    "CLAIMING_SESSION",
    "SCHEMA_NAME",
    "ConsumerWrites",
    "Publishes",
    "Statements",
    "statements",
]

#: Schema names are plain identifiers: they are quoted, but never contain quotes.
# PostgreSQL reserves schema names starting with pg_ for itself.
SCHEMA_NAME = re.compile(r"^(?!pg_)[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Statements(
    TopologyStatements,
    ConsumerStatements,
    FloorStatements,
    OperationStatements,
    ObservingStatements,
    ResultStatements,
    BeatStatements,
):
    """Every statement the project runs, as attributes (by room, in the
    base classes above).

    ``Statements()`` holds the templates (``{s}``: the quoted schema);
    :func:`statements` renders them for one schema.
    """

    schema: str = ""
    #: what a consumer writes, committed as the server is configured ...
    durable_writes: ConsumerWrites = ConsumerWrites()
    #: ... and without waiting for the WAL flush
    async_writes: ConsumerWrites = ConsumerWrites()

    #: publishing, waiting for the WAL flush whatever the session says ...
    durable_publishes: Publishes = Publishes()
    #: ... and without waiting for it
    fast_publishes: Publishes = Publishes()

    def writes(self, async_acks: bool) -> ConsumerWrites:
        """The consumer's statements for the ``async_acks`` transport option."""
        return self.async_writes if async_acks else self.durable_writes

    def publishes(self, durable: bool) -> Publishes:
        """The publishing statements for the ``durable_publish`` transport option."""
        return self.durable_publishes if durable else self.fast_publishes

    @functools.cached_property
    def _digest(self) -> bytes:
        return hashlib.md5(self.schema.encode()).digest()

    @functools.cached_property
    def channel_prefix(self) -> str:
        """Prefix of the NOTIFY channel of every queue: ``prefix || md5(queue)``."""
        return "pgn_" + self._digest[:4].hex() + "_"

    @functools.cached_property
    def lock_namespace(self) -> int:
        """First key of the two-key advisory lock each consumer session holds
        (the second is the consumer id): one namespace per schema."""
        return int.from_bytes(self._digest[4:8], "big") & 0x7FFFFFFF

    @functools.cached_property
    def result_channel_prefix(self) -> str:
        """Prefix of the NOTIFY channel a task's result is announced on."""
        return "pgr_" + self._digest[:4].hex() + "_"

    def channel(self, queue: str) -> str:
        """The NOTIFY channel of ``queue`` (always a short, safe identifier)."""
        return self.channel_prefix + hashlib.md5(queue.encode("utf-8")).hexdigest()

    def consumer_channel(self, queue: str, consumer_id: int) -> str:
        """The NOTIFY channel waking only consumer ``consumer_id`` for ``queue``."""
        digest = hashlib.md5(f"{consumer_id}/{queue}".encode()).hexdigest()
        return self.channel_prefix + digest

    def result_channel(self, task_id: str) -> str:
        """The NOTIFY channel announcing the result of ``task_id``."""
        return self.result_channel_prefix + hashlib.md5(task_id.encode("utf-8")).hexdigest()


def _rendered(templates: Any, ident: str, no_flush: bool = False) -> dict[str, str]:
    out = {}
    for field in fields(templates):
        value = getattr(templates, field.name)
        if isinstance(value, str) and field.name != "schema":
            value = value.replace("{s}", ident)
            value = value.replace("{dur}", NO_FLUSH if no_flush else DURABLE)
            out[field.name] = value.replace("{nf}", NO_FLUSH if no_flush else "true")
    return out


@functools.cache
def statements(schema: str) -> Statements:
    """The statements for ``schema`` (rendered once, then cached)."""
    if not SCHEMA_NAME.match(schema):
        raise ValueError(f"schema name {schema!r} is not a plain identifier")
    ident = f'"{schema}"'  # a plain identifier (checked above) quotes safely
    writes, publishes = ConsumerWrites(), Publishes()
    return Statements(
        schema=schema,
        durable_writes=ConsumerWrites(**_rendered(writes, ident)),
        async_writes=ConsumerWrites(**_rendered(writes, ident, no_flush=True)),
        durable_publishes=Publishes(**_rendered(publishes, ident)),
        fast_publishes=Publishes(**_rendered(publishes, ident, no_flush=True)),
        **_rendered(Statements(), ident),
    )
