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
        from celery import chain
        from proj.tasks import add, flaky, mul, urgent

        print(f"Broker: {re.sub(r':[^:@/]*@', ':**@', url)}")
        add.delay(2, 2)
        mul.apply_async((6, 7), countdown=1)
        flaky.delay("flaky task")
        urgent.delay()
        chain(add.s(1, 2), mul.s(10)).delay()
        wanted = {
            "proj.tasks.add": 2,
            "proj.tasks.mul": 2,
            "proj.tasks.flaky": 1,
            "proj.tasks.urgent": 1,
            "proj.tasks.heartbeat": 2,
        }
        done: dict[str, list[str]] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = {}
            for line in lines:
                m = re.search(r"Task (proj\.tasks\.\w+)\[[^\]]+\] succeeded in [^:]+: (.*)", line)
                if m:
                    done.setdefault(m.group(1), []).append(m.group(2))
            if all(len(done.get(k, [])) >= n for k, n in wanted.items()):
                break
            time.sleep(0.2)
        for name, results in sorted(done.items()):
            print(f"{name:24} -> {', '.join(results)}")
        missing = [k for k, n in wanted.items() if len(done.get(k, [])) < n]
        if missing:
            print("Missing results for:", ", ".join(missing))
            print("".join(lines[-40:]))
            return 1
        print("Quickstart OK: tasks, countdown, retry, priority, chain and beat all ran.")
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
