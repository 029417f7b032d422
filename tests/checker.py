"""A fault checker in the style of Jepsen: a workload, a nemesis, a checker.

* The **workload**: a producer thread sends numbered ``acks_late`` tasks at a
  steady rate, with Celery's publish retry, to a mixed fleet (``celery-pg
  worker`` and the stock ``celery worker``, several processes of each, two
  of them in their own network namespace so their link can be cut). Results
  are stored and beat fires a tick every second from ``celery-pg worker -B``
  (so result and beat sessions are there to be faulted too).
* The **nemesis** runs a schedule of faults, one per episode, while the
  workload flows: SIGKILL and SIGSTOP of workers and children,
  ``pg_terminate_backend`` of each kind of session, PostgreSQL fast restart
  and crash, every table of the schema locked, a network partition.
* The **checker** reads every execution (written by the tasks to files, one
  directory per worker, so counting survives database faults) and sorts
  each task as Jepsen's queue checker does: *lost* (its publish returned
  but it never ran), *duplicated* (it ran more than once), *unexpected* (it
  ran but was never sent), *recovered* (its publish raised, yet it ran).

Each episode owns the tasks sent from its start to the next episode's start.
Its recovery time is the longest a task accepted before the fault ended
waited for its first run, counted from the fault's start (or from its
publish, if later): for a stall, about the stall; for a death, about the
lease. A duplicate is allowed only where the fault
says which workers may rerun work (a worker that really died, was frozen or
partitioned past ``lease_timeout``, or lost its connection, for the stock
worker, which gives back its unacked messages then); the checker demands
that every duplicated task ran at least once on one of those.

It needs no clock but the machine's own: every process runs here.
Used by ``tests/test_checker.py`` (a short schedule, part of the suite) and
``bench/faults.py`` (longer, repeated, printing the README's table).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from celery import Celery

from tests import netpart
from tests.pgserver import as_broker_url, restart
from tests.workers import (
    READY,
    WorkerProcess,
    celery_pg_worker,
    celery_worker,
    close_app,
    worker_env,
)

TASK = "tests.checker_app.mark"
#: Beat: the lease is ``pgnotify_beat_retry`` (1 s in the checker's app) and
#: another process takes over within twice that; a tick is due every second,
#: and reaching a worker and running takes it up to another second.
LONGEST_BEAT_GAP = 2 * 1.0 + 1.0 + 1.0
APP = "tests.checker_app"
SCHEMA = "checker"


@dataclass
class Member:
    """One worker process of the fleet (restarted under the same name)."""

    name: str
    kind: str  # "celery-pg" or "celery"
    args: tuple[str, ...]
    cut_off: bool  # behind the link the nemesis can cut
    process: WorkerProcess | None = None
    generation: int = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.proc.pid


class Fleet:
    """The workers, their server, and the link two of them sit behind."""

    def __init__(self, server: Any, workdir: str, concurrency: int = 2, per_kind: int = 1) -> None:
        self.server = server
        self.dsn: str = server.get_uri()
        self.workdir = workdir
        # Twice as quick as the defaults (2 s / 8 s), not as tight as the
        # other fault tests: on a small loaded machine, with this process
        # relaying the cut-off workers' traffic, a 2 s lease is missed by
        # load alone, and a consumer silent that long is rightly reaped.
        self.options: dict[str, Any] = {
            "schema": SCHEMA,
            "heartbeat_interval": 1.0,
            "lease_timeout": 4.0,
        }
        self.url = as_broker_url(self.dsn)
        self.link: netpart.Link | None = None
        self.relay: netpart.Relay | None = None
        self.no_partition = netpart.available()
        if self.no_partition is None:
            self.link = netpart.Link()
            self.relay = netpart.Relay(self.link.host_ip, netpart.upstream_of(self.dsn))
        self.members: list[Member] = []
        self.retired: list[WorkerProcess] = []
        self.reader = _Reader()
        c = str(concurrency)
        # The cut-off celery-pg worker starts first, so it leads beat at first.
        # Every celery-pg worker runs beat too, with children recycled often
        # (so forked after beat connected).
        pg_args = ("-c", c, "-B", "--max-tasks-per-child", "20")
        specs = [
            ("pg-cut", "celery-pg", pg_args, True),
            ("stock-cut", "celery", ("-c", c), True),
        ]
        for n in range(1, per_kind + 1):
            suffix = "" if n == 1 else f"-{n}"
            specs.append((f"pg{suffix}", "celery-pg", pg_args, False))
            specs.append((f"stock{suffix}", "celery", ("-c", c), False))
        try:
            for name, kind, args, cut in specs:
                member = Member(name, kind, args, cut and self.link is not None)
                self.members.append(member)
                self.start(member)
                if name == "pg-cut":
                    self.wait_leader(member)
        except BaseException:
            self.close()  # what started so far, and the link
            raise

    def marks_dir(self, member: Member) -> str:
        path = os.path.join(self.workdir, member.name)
        os.makedirs(path, exist_ok=True)
        return path

    def start(self, member: Member) -> None:
        url = self.url
        prefix: tuple[str, ...] = ()
        if member.cut_off:
            assert self.link is not None and self.relay is not None
            url = netpart.through(url, self.link.host_ip, self.relay.port)
            prefix = self.link.prefix()
        env = worker_env(url, self.options, "", "")
        env["PGNOTIFY_MARK_DIR"] = self.marks_dir(member)
        member.generation += 1
        name = f"{member.name}-{member.generation}"
        args = list(member.args)
        if member.kind == "celery-pg":
            if "-B" in args:
                args += ["-s", os.path.join(self.workdir, f"{name}.schedule")]
            process = celery_pg_worker(
                env, *args, name=name, app=APP, loglevel="info", prefix=prefix
            )
        else:
            process = celery_worker(env, *args, name=name, app=APP, prefix=prefix)
        if member.process is not None:
            self.retired.append(member.process)
        member.process = process
        process.wait_for(READY[member.kind])

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def leader(self) -> Member | None:
        """The member whose process holds the beat lease now."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                f"SELECT holder FROM {SCHEMA}.beat_leader WHERE expires_at > now()"  # noqa: S608
            ).fetchone()
        if row is None:
            return None
        pid = int(row[0].split(":")[1])
        return next((m for m in self.members if m.process and m.pid == pid), None)

    def wait_leader(self, member: Member, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.leader() is member:
                    return
            except psycopg.errors.UndefinedTable:
                pass
            time.sleep(0.2)

    def children(self, member: Member) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(member.pid)], capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]

    def terminate(self, application_name: str) -> int:
        """``pg_terminate_backend`` of every session of one kind."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()",
                (application_name,),
            ).fetchall()
        return len(rows)

    def processes(self) -> list[WorkerProcess]:
        """Every worker process started, the retired ones first."""
        return [*self.retired, *(m.process for m in self.members if m.process)]

    def output(self) -> str:
        """What went wrong in each worker, as it said (warnings and errors)."""
        parts = []
        for m in self.members:
            if m.process is not None:
                said = [
                    line
                    for line in m.process.lines
                    if ("WARNING" in line or "ERROR" in line or "CRITICAL" in line)
                    and "matched no queue" not in line
                ]
                parts.append(f"--- {m.name} ({m.kind}) ---\n" + "".join(said[-40:]))
        return "\n".join(parts)

    def close(self) -> None:
        try:
            if self.link is not None and self.link.cut:
                self.link.heal()
            for process in self.processes():
                process.kill(signal.SIGCONT)
                process.stop()
        finally:
            if self.relay is not None:
                self.relay.close()
            if self.link is not None:
                self.link.close()


class Producer:
    """Numbered tasks at a steady rate from a thread; what each publish did."""

    def __init__(self, fleet: Fleet, rate: float, seconds: float) -> None:
        self.app = Celery("checker-producer", broker=fleet.url)
        self.app.conf.broker_transport_options = fleet.options
        self.app.conf.task_ignore_result = True
        self.rate = rate
        self.seconds = seconds
        self.ok: set[int] = set()
        self.sent_at: dict[int, float] = {}  # when each publish returned
        self.raised: set[int] = set()
        self.next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        policy = {
            "max_retries": 100,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.5,
        }
        started = time.monotonic()
        while not self._stop.is_set():
            i = self.next
            try:
                self.app.send_task(TASK, args=(i, self.seconds), retry=True, retry_policy=policy)
                self.ok.add(i)
                self.sent_at[i] = time.time()
            except Exception:  # noqa: BLE001 - counted: a publish may raise, never lose
                self.raised.add(i)
            self.next = i + 1
            wait = started + self.next / self.rate - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        close_app(self.app)


class Run(NamedTuple):
    """One execution of a numbered task."""

    member: str  # the worker that ran it
    at: float  # when it ended
    task_id: str  # Celery's id: another id for the same number is another publish
    redelivered: bool  # the message had been delivered before


@dataclass
class History:
    """Every execution: task number -> [(member name, end time)], and ticks."""

    runs: dict[int, list[Run]]
    ticks: list[float]

    @classmethod
    def read(cls, fleet: Fleet) -> History:
        """Everything written so far (read incrementally: only what was
        added since the last call, so the checker stays light on a busy
        machine: its process also relays the cut-off workers' traffic)."""
        return fleet.reader.read(fleet)

    def per_member(self) -> str:
        """How many executions each worker made (every one must take part)."""
        counts = Counter(r.member for runs in self.runs.values() for r in runs)
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))


class _Reader:
    """Reads the executions the tasks append to their files, each byte once."""

    def __init__(self) -> None:
        self._offsets: dict[str, int] = {}
        self._runs: dict[int, list[Run]] = {}
        self._ticks: list[float] = []

    def _new_lines(self, path: str) -> list[str]:
        with open(path, "rb") as f:
            f.seek(self._offsets.get(path, 0))
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written waits
        self._offsets[path] = self._offsets.get(path, 0) + len(complete)
        return complete.decode().splitlines()

    def read(self, fleet: Fleet) -> History:
        for member in fleet.members:
            base = fleet.marks_dir(member)
            for path in glob.glob(os.path.join(base, "*.marks")):
                for line in self._new_lines(path):
                    index, at, task_id, again = line.split()
                    self._runs.setdefault(int(index), []).append(
                        Run(member.name, float(at), task_id, again == "1")
                    )
            for path in glob.glob(os.path.join(base, "*.ticks")):
                self._ticks += [float(x) for x in self._new_lines(path)]
        return History({i: list(r) for i, r in self._runs.items()}, sorted(self._ticks))


@dataclass
class Fault:
    """One kind of fault. ``inject`` returns when the fault has ended, with
    the names of the members allowed to rerun work because of it."""

    name: str
    inject: Callable[[Fleet], set[str]]
    beat: bool = False  # the tick gap across it is checked


@dataclass
class Episode:
    fault: Fault
    first: int  # task numbers first..last-1 belong to the episode
    last: int = 0
    started: float = 0.0
    ended: float = 0.0
    boundary: int = 0  # tasks below it were sent before the fault ended
    may_rerun: set[str] = field(default_factory=set)
    leader_before: str | None = None


@dataclass
class Outcome:
    fault: str
    tasks: int
    lost: list[int]
    duplicated: int
    unexpected: list[int]
    recovered: int
    recovery: float
    tick_gap: float | None
    bad_duplicates: dict[int, list[Run]]  # no run on a member allowed to rerun
    slowest: tuple[int, str, float] | None = None  # the task that waited longest, who ran it
    duration: float = 0.0  # how long the fault lasted

    def problems(self) -> list[str]:
        """What breaks the promise in this outcome (nothing, when it holds)."""
        bad = []
        if self.lost:
            bad.append(f"{self.fault}: lost {len(self.lost)}, e.g. {self.lost[:20]}")
        if self.unexpected:
            bad.append(f"{self.fault}: never sent, yet ran: {self.unexpected[:20]}")
        if self.bad_duplicates:
            bad.append(
                f"{self.fault}: ran twice though no worker that ran them died: "
                f"{dict(list(self.bad_duplicates.items())[:20])}"
            )
        if self.tick_gap is not None and self.tick_gap > LONGEST_BEAT_GAP:
            bad.append(f"{self.fault}: beat silent for {self.tick_gap:.1f} s")
        return bad

    def row(self) -> str:
        gap = "" if self.tick_gap is None else f"{self.tick_gap:.1f} s"
        return (
            f"| {self.fault} | {self.tasks} | {len(self.lost)} | {self.duplicated} | "
            f"{len(self.unexpected)} | {self.recovered} | {self.recovery:.1f} s | {gap} |"
        )


HEADER = (
    "| fault | tasks | lost | duplicated | unexpected | recovered | recovery | longest beat gap |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def _freeze(names: list[str], seconds: float) -> Callable[[Fleet], set[str]]:
    def inject(fleet: Fleet) -> set[str]:
        members = [fleet.member(n) for n in names]
        for m in members:
            assert m.process is not None
            m.process.kill(signal.SIGSTOP)
        time.sleep(seconds)
        for m in members:
            assert m.process is not None
            m.process.kill(signal.SIGCONT)
        # Past the lease the frozen worker was declared dead: it may rerun.
        return set(names) if seconds >= fleet.options["lease_timeout"] else set()

    return inject


def _kill_children(fleet: Fleet) -> set[str]:
    """reject_on_worker_lost: the killed child's task runs again, and twice
    if the child had finished it but not yet said so."""
    killed = set()
    for m in fleet.members:
        children = fleet.children(m)
        if children:
            os.kill(children[0], signal.SIGKILL)
            killed.add(m.name)
    return killed


def _kill_workers(fleet: Fleet) -> set[str]:
    """SIGKILL the beat leader and a stock worker (main and children), then
    start them again: a real death, so they may rerun."""
    leader = fleet.leader() or fleet.member("pg")
    victims = [leader, fleet.member("stock")]
    for m in victims:
        assert m.process is not None
        m.process.kill(signal.SIGKILL)
        m.process.proc.wait()
    for m in victims:
        fleet.start(m)
    return {m.name for m in victims}


def _terminate(application_name: str, reruns: str) -> Callable[[Fleet], set[str]]:
    def inject(fleet: Fleet) -> set[str]:
        for _ in range(3):  # once idle-ish, twice under load
            fleet.terminate(application_name)
            time.sleep(0.5)
        return {m.name for m in fleet.members if m.kind == reruns}

    return inject


def _lock_tables(seconds: float) -> Callable[[Fleet], set[str]]:
    def inject(fleet: Fleet) -> set[str]:
        with psycopg.connect(fleet.dsn) as conn, conn.transaction():
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (SCHEMA,)
                )
            ]
            names = ", ".join(f'"{SCHEMA}"."{t}"' for t in tables)
            conn.execute(f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE")
            time.sleep(seconds)
        return set()  # a stall, not a death: nothing may run twice

    return inject


def _lead_from(fleet: Fleet, name: str) -> None:
    """Make ``name`` the beat leader: every other ``celery-pg worker -B`` is
    stopped gracefully (a warm shutdown hands the lease back at once, and
    runs nothing twice) until ``name`` holds the lease, then started again."""
    wanted = fleet.member(name)
    if fleet.leader() is wanted:
        return
    others = [m for m in fleet.members if m.kind == "celery-pg" and m is not wanted]
    for member in others:
        assert member.process is not None
        member.process.stop()
    try:
        fleet.wait_leader(wanted, timeout=10)
    finally:
        for member in others:
            fleet.start(member)
    if fleet.leader() is not wanted:
        raise AssertionError(f"{name} did not take the beat lease")


def _partition(seconds: float, beat_leader: bool = False) -> Callable[[Fleet], set[str]]:
    def inject(fleet: Fleet) -> set[str]:
        assert fleet.link is not None
        if beat_leader:
            _lead_from(fleet, "pg-cut")
        fleet.link.partition()
        try:
            time.sleep(seconds)
        finally:
            fleet.link.heal()
        if seconds < fleet.options["lease_timeout"]:
            return set()
        return {m.name for m in fleet.members if m.cut_off}

    return inject


def _pg(mode: str) -> Callable[[Fleet], set[str]]:
    def inject(fleet: Fleet) -> set[str]:
        restart(fleet.server, mode)
        if mode == "immediate":  # acks committed without the flush may be undone
            return {m.name for m in fleet.members}
        return {m.name for m in fleet.members if m.kind == "celery"}

    return inject


def schedule(fleet: Fleet, scale: float = 1.0) -> list[Fault]:
    """Every fault once; ``scale`` stretches the timed ones (not the stalls
    meant to stay shorter than ``lease_timeout``)."""
    lease = fleet.options["lease_timeout"]
    faults = [
        Fault("SIGKILL of one pool child of every worker", _kill_children),
        Fault(
            f"SIGSTOP of a worker of each kind for {0.5 * lease:.1f} s (< lease_timeout)",
            _freeze(["pg", "stock"], 0.5 * lease),
        ),
        Fault(
            "pg_terminate_backend of the LISTEN sessions, 3 times",
            _terminate("celery-pgnotify-listener", "none"),
        ),
        Fault(
            "pg_terminate_backend of the claim/ack/publish sessions, 3 times",
            _terminate("celery-pgnotify", "celery"),
        ),
        Fault(
            "pg_terminate_backend of the result sessions, 3 times",
            _terminate("celery-pgnotify-results", "none"),
        ),
        Fault(
            "pg_terminate_backend of the beat sessions, 3 times",
            _terminate("celery-pgnotify-beat", "none"),
            beat=True,
        ),
        Fault(
            f"every table of the schema locked for {10 * scale:.0f} s",
            _lock_tables(10 * scale),
        ),
    ]
    if fleet.link is not None:
        faults += [
            # TCP retransmits with exponential backoff (200 ms, doubling): a
            # cut of d seconds is a silence of up to about 2d + 0.2 s, and
            # only a silence past lease_timeout is a death.
            Fault(
                f"network partition of 2 workers for {0.25 * lease:.1f} s "
                "(a silence < lease_timeout)",
                _partition(0.25 * lease),
            ),
            Fault(
                f"network partition of 2 workers (one the beat leader) for "
                f"{2.5 * lease * scale:.0f} s",
                _partition(2.5 * lease * scale, beat_leader=True),
                beat=True,
            ),
        ]
    faults += [
        Fault(
            f"SIGSTOP of a worker of each kind for {2.5 * lease * scale:.0f} s (> lease_timeout)",
            _freeze(["pg", "stock"], 2.5 * lease * scale),
        ),
        Fault(
            "SIGKILL of the beat leader (celery-pg worker -B, recycled children) "
            "and a stock worker, restarted",
            _kill_workers,
            beat=True,
        ),
        Fault("PostgreSQL fast restart", _pg("fast")),
        Fault("PostgreSQL crash (immediate stop) and restart", _pg("immediate")),
    ]
    return faults


def _wait_ran(fleet: Fleet, tasks: set[int], timeout: float) -> History:
    deadline = time.monotonic() + timeout
    while True:
        history = History.read(fleet)
        if tasks <= history.runs.keys() or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def run(
    fleet: Fleet,
    faults: list[Fault],
    rate: float = 40,
    seconds: float = 0.05,
    lead: float = 1.5,
    settle: float = 2.0,
    timeout: float = 90,
    log: Callable[[str], None] = lambda _: None,
) -> list[Outcome]:
    """Run the workload through every fault in turn; the outcome of each."""
    producer = Producer(fleet, rate, seconds)
    episodes: list[Episode] = []
    try:
        for fault in faults:
            episode = Episode(fault, first=producer.next)
            episodes.append(episode)
            time.sleep(lead)
            leader = fleet.leader()
            episode.leader_before = leader.name if leader else None
            log(f"fault: {fault.name} (beat leader {episode.leader_before})")
            episode.started = time.time()
            episode.may_rerun = fault.inject(fleet)
            episode.ended = time.time()
            episode.boundary = producer.next
            accepted = producer.ok.copy()  # (the producer adds to it meanwhile)
            _wait_ran(fleet, {i for i in accepted if i < episode.boundary}, timeout)
            time.sleep(settle)
    finally:
        producer.stop()
    for before, after in zip(episodes, episodes[1:], strict=False):
        before.last = after.first
    episodes[-1].last = producer.next
    # Whatever a thawed or healed worker would still run shows up by now.
    history = _wait_ran(fleet, set(producer.ok), timeout)
    time.sleep(2 * fleet.options["lease_timeout"])
    history = History.read(fleet)
    outcomes = [_judge(e, producer, history) for e in episodes]
    # A number never sent at all belongs to no episode: the last one shows it.
    outcomes[-1].unexpected += [i for i in history.runs if not 0 <= i < producer.next]
    return outcomes


def _judge(e: Episode, producer: Producer, history: History) -> Outcome:
    span = range(e.first, e.last)
    runs = {i: history.runs[i] for i in span if i in history.runs}
    lost = [i for i in span if i in producer.ok and i not in runs]
    counts = Counter({i: len(r) for i, r in runs.items()})
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    bad = {
        i: runs[i]
        for i, n in counts.items()
        if n > 1 and not any(r.member in e.may_rerun for r in runs[i])
    }
    unexpected = [i for i in runs if i not in producer.ok and i not in producer.raised]
    recovered = sum(1 for i in runs if i in producer.raised)
    # How long the work accepted before the fault ended waited past its start.
    waits = [
        min(r.at for r in runs[i]) - max(producer.sent_at.get(i, e.started), e.started)
        for i in range(e.first, e.boundary)
        if i in runs
    ]
    recovery = max([0.0, *waits])
    slowest = None
    if waits and recovery > 0:
        late = [j for j in range(e.first, e.boundary) if j in runs]
        i = late[waits.index(recovery)]
        slowest = (i, min(runs[i], key=lambda r: r.at).member, recovery)
    tick_gap = None
    if e.fault.beat:
        until = max(e.ended, e.started + recovery) + 4
        ticks = [t for t in history.ticks if e.started - 2 <= t <= until]
        tick_gap = max(
            (b - a for a, b in zip(ticks, ticks[1:], strict=False)), default=float("inf")
        )
    return Outcome(
        e.fault.name,
        len(span),
        lost,
        duplicated,
        unexpected,
        recovered,
        recovery,
        tick_gap,
        bad,
        slowest,
        e.ended - e.started,
    )
