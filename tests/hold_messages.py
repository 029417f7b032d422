"""A consumer process for fault tests: takes messages, never acks, waits.

Usage: python -m tests.hold_messages BROKER_URL SCHEMA QUEUE COUNT [OPTION=VALUE...]
Prints "held <n>" once it holds COUNT messages, then sleeps until killed.
With ``fork=1`` among the options it then forks a child that sleeps (as a
pool child forked after the connection exists would), and prints
"held <n> child <pid>".
"""

from __future__ import annotations

import os
import sys
import time

from kombu import Connection, Consumer, Exchange, Queue


def main() -> None:
    url, schema, queue_name, count = sys.argv[1:5]
    options: dict[str, object] = {"schema": schema}
    fork = False
    for arg in sys.argv[5:]:
        key, _, value = arg.partition("=")
        if key == "fork":
            fork = value == "1"
        else:
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
            if fork:
                child = os.fork()
                if child == 0:
                    time.sleep(60)
                    os._exit(0)
                print(f"held {len(held)} child {child}", flush=True)
            else:
                print(f"held {len(held)}", flush=True)
            while True:
                time.sleep(0.5)
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass


if __name__ == "__main__":
    main()
