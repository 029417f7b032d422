"""Run the quickstart end to end: a worker with beat, some tasks, their results.

The database: see ``examples/database.py``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from database import database_url  # noqa: E402  (examples/database.py)


def main() -> int:
    url, server = database_url()
    env = dict(os.environ, PGNOTIFY_URL=url, PYTHONPATH=HERE)
    os.environ.update(PGNOTIFY_URL=url)
    sys.path.insert(0, HERE)
    beat_db = os.path.join(tempfile.mkdtemp(), "beat-schedule")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "proj",
            "worker",
            "-B",
            "-s",
            beat_db,
            "-l",
            "info",
            "-c",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert worker.stdout is not None
        for line in worker.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        from celery import chain, chord
        from proj.tasks import add, flaky, mul, total, urgent

        print(f"Broker and results: {re.sub(r':[^:@/]*@', ':**@', url)}")
        sent = {
            "add(2, 2)": add.delay(2, 2),
            "mul(6, 7), countdown 1 s": mul.apply_async((6, 7), countdown=1),
            "flaky (retried once)": flaky.delay("flaky task"),
            "urgent (priority 9)": urgent.delay(),
            "chain add(1, 2) | mul(10)": chain(add.s(1, 2), mul.s(10)).delay(),
            "chord of add(i, i) -> total": chord(
                [add.s(i, i) for i in range(5)], total.s()
            ).delay(),
        }
        for label, result in sent.items():
            print(f"{label:28} -> {result.get(timeout=60)}")
        deadline = time.monotonic() + 30
        beats: list[str] = []
        while time.monotonic() < deadline and len(beats) < 2:
            beats = [
                m.group(1)
                for m in (
                    re.search(
                        r"Task proj\.tasks\.heartbeat\[[^\]]+\] succeeded in [^:]+: (.*)", line
                    )
                    for line in list(lines)
                )
                if m
            ]
            time.sleep(0.2)
        print(f"{'beat_schedule heartbeat':28} -> {', '.join(beats) or 'did not fire'}")
        if len(beats) < 2:
            print("".join(lines[-40:]))
            return 1
        print("Quickstart OK: tasks, countdown, retry, priority, chain, chord and beat all ran.")
        return 0
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        if worker.stdout is not None:
            worker.stdout.close()
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
