"""A consumer process for fault tests: takes messages, never acks, waits.

Usage: python -m tests.hold_messages BROKER_URL SCHEMA QUEUE COUNT [OPTION=VALUE...]
Prints "held <n>" once it holds COUNT messages, then sleeps until killed.
"""

from __future__ import annotations

import sys
import time

from kombu import Connection, Consumer, Exchange, Queue


def main() -> None:
    url, schema, queue_name, count = sys.argv[1:5]
    options: dict[str, object] = {"schema": schema}
    for arg in sys.argv[5:]:
        key, _, value = arg.partition("=")
        options[key] = float(value)
    held = []
    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
    with Connection(url, transport_options=options) as conn:
        with Consumer(conn, [queue], callbacks=[lambda b, m: held.append(m)]):
            while len(held) < int(count):
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    pass
            print(f"held {len(held)}", flush=True)
            while True:
                time.sleep(0.5)
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass


if __name__ == "__main__":
    main()
