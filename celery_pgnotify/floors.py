"""The queues' floors: below a queue's floor no message is ready.

A claim reads ``messages_ready`` from the head of its queue. The index keeps
an entry for every row until vacuum removes the row, and vacuum cannot
while any transaction in the database holds an older snapshot (an analytics
query, a session idle in a transaction): then every claim would walk, row by
row, every message acked since. With ``id >= floor`` among its conditions it
skips those entries in the index itself, without visiting their rows.

A floor must never pass a message that is, or will be, ready:

- A requeue (a reject, a closed consumer's unacked messages, the reaper's
  releases) lowers the floor of its queue in its own statement
  (``fragments.lower_floors``).
- The raiser (one consumer at a time, after its reaps) holds the
  floor rows while it reads the lowest ready id of each queue: a requeue
  that lowered a floor before is seen, one that comes after waits for the
  raise and lowers its result. A raiser that stalls inside its transaction
  loses its session after ``heartbeat_interval`` idle there, so the
  requeues of the fleet wait that long at most.
- A publish still running may hold an id lower than what is visible. So the
  raiser never goes past a *mark*: the identity's value at one round, taken
  before the list of the sessions then writing ``messages`` (a publish is
  handed its id after it takes its lock on the table, so any publish with
  an id up to the mark is on that list). At a later round, once every one of
  those sessions has ended, no transaction can still hold an id up to the
  mark, and the floors may rise to it.

While a worker older than the floors is registered (it does not lower them
when it requeues), the raiser also looks below the floors now and then for
a ready message, and lowers the floor to it.

Every consumer reaps after each heartbeat, but a round of raising probes
each queue's index: of n consumers, each raises after a reap with
probability 1/n, so the fleet raises about once per ``heartbeat_interval``
whatever its size (its cost per task does not grow with idle consumers).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import psycopg

from celery_pgnotify.statements import Statements

logger = logging.getLogger(__name__)


#: Every how many rounds, while a worker older than the floors is
#: registered, the raiser also looks below them (see ``floors_check``): a
#: message such a worker made ready waits at most that many rounds.
CHECK_EVERY = 15


class FloorRaiser:
    """Raises the queues' floors; called after each reap (see reaper.py)."""

    def __init__(self, stmts: Statements, idle_timeout: float) -> None:
        self._stmts = stmts
        #: how long a round may sit idle inside its transaction (seconds)
        self._idle_ms = str(max(1, int(idle_timeout * 1000)))
        self._messages = f'"{stmts.schema}".messages'
        self._rounds = 0
        #: the consumers registered at the last round: they take turns
        self._fleet = 1
        # Its own generator: the module's is the application's (a test seeds
        # it, Hypothesis watches it), and this thread must not move it.
        self._turns = random.Random()

    def raise_floors(self, conn: psycopg.Connection[Any]) -> None:
        """One round, this consumer's turn (see the module docstring); a
        database error other than a lost connection costs the round only
        (the floors stay where they are, which is safe)."""
        if self._turns.random() * self._fleet >= 1:
            return  # another consumer's turn, most likely
        try:
            self._round(conn)
        except psycopg.OperationalError:
            raise  # a lost connection, a lock or statement timeout: the reaper's to handle
        except psycopg.DatabaseError as exc:
            logger.warning("Raising the queues' floors failed (%s); they stay", exc)

    def _round(self, conn: psycopg.Connection[Any]) -> None:
        stmts = self._stmts
        self._rounds += 1
        with conn.transaction():
            gate = conn.execute(
                stmts.floors_gate, {"ns": stmts.lock_namespace, "idle": self._idle_ms}
            ).fetchone()
            assert gate is not None  # one row
            self._fleet = max(1, int(gate[1]))
            if not gate[0]:
                return  # another consumer is raising them
            # New floors rows, held by this transaction until it ends: a
            # requeue inserting the same row waits, then lowers it.
            conn.execute(stmts.floors_seed)
            row = conn.execute(stmts.floors_mark).fetchone()
            assert row is not None  # one row, mark or no mark
            seq, safe, older_workers = row
            conn.execute(stmts.floors_hold).fetchall()
            if older_workers and self._rounds % CHECK_EVERY == 0:
                for queue, floor in conn.execute(stmts.floors_check).fetchall():
                    logger.warning(
                        "A ready message of queue %r was below its floor (made ready by an "
                        "older celery-pgnotify?): floor lowered to %s",
                        queue,
                        floor,
                    )
            if seq is not None and safe:
                conn.execute(stmts.floors_raise, {"seq": seq})
            row = conn.execute(stmts.messages_seq, {"messages": self._messages}).fetchone()
            seq = int(row[0]) if row else 0
            conn.execute(stmts.floors_write_mark, {"seq": seq, "messages": self._messages})
