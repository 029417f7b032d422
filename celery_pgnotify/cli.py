"""The ``celery-pg`` command line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click


def _settings(app_path: str | None, url: str | None, schema: str | None) -> tuple[str, str]:
    """The broker URL and schema from ``--url/--schema`` or the app's settings."""
    options: dict[str, Any] = {}
    if app_path:
        from celery.app.utils import find_app

        app = find_app(app_path)
        url = url or app.conf.broker_url
        options = dict(app.conf.broker_transport_options or {})
    if not url:
        raise click.UsageError("give --url or -A/--app (whose broker_url is used)")
    if schema:
        options["schema"] = schema
    from celery_pgnotify.connect import conninfo_from_url
    from celery_pgnotify.options import TransportOptions

    opts = TransportOptions.from_mapping(options)
    return conninfo_from_url(url, opts.dsn, opts.connect_timeout), opts.schema


_app_option = click.option("-A", "--app", "app_path", help="Celery app whose settings to use.")
_url_option = click.option("--url", help="pgnotify:// or postgresql:// URL of the database.")
_schema_option = click.option("--schema", help="Schema name (default: the transport's).")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _where(function: Any) -> Any:
    """-A/--url/--schema: which database and schema a command works on."""
    return _app_option(_url_option(_schema_option(function)))


def _open(app_path: str | None, url: str | None, schema: str | None) -> tuple[Any, Any]:
    """(connection, statements) for an operations command."""
    import psycopg

    from celery_pgnotify import statements
    from celery_pgnotify.connect import connect

    conninfo, schema_name = _settings(app_path, url, schema)
    stmts = statements.statements(schema_name)
    try:
        conn = connect(conninfo)
        conn.execute(stmts.no_jit)  # never worth it for these one-off reads
    except psycopg.Error as exc:
        raise click.ClickException(f"cannot connect to PostgreSQL: {exc}") from None
    return conn, stmts


def _connected(function: Any) -> Any:
    """-A/--url/--schema; the command is called with ``conn`` (open while it
    runs) and ``stmts`` in their place."""

    @functools.wraps(function)
    def command(app_path: str | None, url: str | None, schema: str | None, **rest: Any) -> Any:
        import psycopg

        conn, stmts = _open(app_path, url, schema)
        with conn:
            try:
                return function(conn=conn, stmts=stmts, **rest)
            except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
                raise click.ClickException(
                    f"schema {stmts.schema!r} is missing or older than this celery-pgnotify: "
                    "run 'celery-pg migrate' (or 'celery-pg check')"
                ) from None

    return _where(command)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as an aligned text table (numbers to the right)."""
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        import json

        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


@click.group()
def main() -> None:
    """celery-pgnotify: Celery on PostgreSQL alone."""


@main.command()
@_where
def migrate(app_path: str | None, url: str | None, schema: str | None) -> None:
    """Create or upgrade the schema (idempotent; safe to run concurrently)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from celery_pgnotify import migrations
    from celery_pgnotify.connect import connect

    conninfo, schema_name = _settings(app_path, url, schema)
    with connect(conninfo) as conn:
        applied = migrations.migrate(conn, schema_name)
        version = migrations.schema_version(conn, schema_name)
    if applied:
        click.echo(
            f"schema {schema_name}: applied {', '.join(map(str, applied))}; "
            f"now at version {version}"
        )
    else:
        click.echo(f"schema {schema_name}: up to date at version {version}")


#: the counts ``celery-pg status`` may show estimated
ESTIMABLE = ("ready", "leased", "delayed", "dead_letters", "scheduled")


@main.command()
@_connected
@_json_option
def status(conn: Any, stmts: Any, as_json: bool) -> None:
    """Queues (ready, leased, delayed, oldest age, dead letters, scheduled) and live consumers."""
    from celery_pgnotify import ops

    data = ops.status(conn, stmts)
    # "~": estimated from a sample of the table (a queue over metrics.CAP)
    shown = [
        {k: f"~{v}" if q["estimated"] and k in ESTIMABLE else v for k, v in q.items()}
        for q in data["queues"]
    ]
    text = _table(
        shown,
        [
            "queue",
            "ready",
            "leased",
            "delayed",
            "oldest_ready_s",
            "dead_letters",
            "scheduled",
            "next_due_s",
            "paused",
        ],
    )
    text += "\n\nconsumers (workers and their LISTEN sessions)\n"
    text += _table(
        [dict(c, queues=",".join(c["queues"])) for c in data["consumers"]],
        ["hostname", "pid", "queues", "last_heartbeat_s", "hungry", "last_fed_s", "started_at"],
    )
    _emit(data, as_json, text)


def _pausing(name: str, paused: bool, summary: str) -> None:
    """``celery-pg pause`` and ``celery-pg resume``."""

    @main.command(name=name, help=summary)
    @click.argument("queue")
    @_connected
    def command(conn: Any, stmts: Any, queue: str) -> None:
        from celery_pgnotify import ops

        changed = (ops.pause if paused else ops.resume)(conn, stmts, queue)
        verb = "paused" if paused else "resumed"
        click.echo(f"{queue!r} {verb}" if changed else f"{queue!r} was {verb} already")


_pausing("pause", True, "Stop workers taking tasks from QUEUE; publishing goes on.")
_pausing("resume", False, "Let workers take tasks from QUEUE again (its backlog drains at once).")


@main.command()
@click.argument("queue")
@_connected
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(conn: Any, stmts: Any, queue: str, yes: bool) -> None:
    """Delete the ready messages of QUEUE (messages being worked on are left)."""
    from celery_pgnotify import ops

    if not yes:
        click.confirm(f"Delete every ready message of queue {queue!r}?", abort=True)
    click.echo(f"{ops.purge(conn, stmts, queue)} message(s) deleted from {queue!r}")


@main.command()
@click.argument("task_id")
@_connected
@_json_option
def explain(conn: Any, stmts: Any, task_id: str, as_json: bool) -> None:
    """Where is TASK_ID? Waiting, scheduled, taken by a worker, dead, finished..."""
    from celery_pgnotify.explain import explain as explain_task

    answer = explain_task(conn, stmts, task_id)
    _emit(answer, as_json, f"{task_id}: {answer['summary']}")


@main.group("dead-letters")
def dead_letters() -> None:
    """Messages no worker could run, with the reason: list, retry, drop."""


@dead_letters.command("list")
@_connected
@click.option("--queue", help="Only this queue's dead letters.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@_json_option
def dead_letters_list(conn: Any, stmts: Any, queue: str | None, limit: int, as_json: bool) -> None:
    """Show dead letters, oldest first."""
    from celery_pgnotify import ops

    rows = ops.dead_letters(conn, stmts, queue=queue, limit=limit)
    _emit(rows, as_json, _table(rows, ["id", "queue", "task", "task_id", "reason", "dead_at"]))


def _chosen(ids: tuple[int, ...], queue: str | None, everything: bool) -> list[int] | None:
    if not ids and not queue and not everything:
        raise click.UsageError("name dead letters by ID, or use --queue or --all")
    return list(ids) or None


def _on_selection(function: Any) -> Any:
    """IDS..., --queue, --all and where to connect: the command is called
    with an open connection, its statements, and the dead letters chosen."""

    @functools.wraps(function)
    def command(
        conn: Any, stmts: Any, ids: tuple[int, ...], queue: str | None, everything: bool
    ) -> None:
        function(conn, stmts, queue, _chosen(ids, queue, everything))

    wrapped = click.option("--all", "everything", is_flag=True, help="Every dead letter.")(command)
    wrapped = click.option("--queue", help="Every dead letter of this queue.")(wrapped)
    return click.argument("ids", nargs=-1, type=int)(_connected(wrapped))


@dead_letters.command("retry")
@_on_selection
def dead_letters_retry(conn: Any, stmts: Any, queue: str | None, chosen: list[int] | None) -> None:
    """Put dead letters back on the queue they came from."""
    from celery_pgnotify import ops

    moved = ops.retry_dead_letters(conn, stmts, queue, chosen)
    for name, count in sorted(moved.items()):
        click.echo(f"{count} message(s) back on {name!r}")
    if not moved:
        click.echo("no dead letter matched")


@dead_letters.command("drop")
@_on_selection
def dead_letters_drop(conn: Any, stmts: Any, queue: str | None, chosen: list[int] | None) -> None:
    """Delete dead letters for good."""
    from celery_pgnotify import ops

    click.echo(f"{ops.drop_dead_letters(conn, stmts, queue, chosen)} dead letter(s) deleted")


@main.command()
@_where
@_json_option
@click.option("--strict", is_flag=True, help="Exit 2 when a check warns (and none fails), not 0.")
@click.option(
    "--max-transaction-age",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds a transaction may hold back vacuum before a warning.",
)
@click.option(
    "--max-notify-queue",
    type=click.FloatRange(min=0, max=1),
    default=0.05,
    show_default=True,
    help="Fraction of the notification queue in use before a warning.",
)
@click.option(
    "--max-clock-offset",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds a consumer's clock may be off the server's before a warning.",
)
def check(
    app_path: str | None,
    url: str | None,
    schema: str | None,
    as_json: bool,
    strict: bool,
    max_transaction_age: float,
    max_notify_queue: float,
    max_clock_offset: float,
) -> None:
    """Which guarantees hold: one line per check, ok / warn / fail, with the reason.

    Exit 1 when a check fails (the database does not answer, the schema is
    not current, LISTEN cannot work...), else 0 (2 with --strict when one warns).
    """
    from celery_pgnotify import health

    conninfo, schema_name = _settings(app_path, url, schema)
    limits = health.Limits(
        transaction_age=max_transaction_age,
        notify_queue=max_notify_queue,
        clock_offset=max_clock_offset,
    )
    found = health.run(conninfo, schema_name, limits)
    failed = [f for f in found if f.level == health.FAIL]
    warned = [f for f in found if f.level == health.WARN]
    width = max(len(f.name) for f in found)
    text = "\n".join(f"{f.level:<4}  {f.name:<{width}}  {f.detail}" for f in found)
    summary = failed[0].detail if failed else "ok"
    data = {
        "ok": not failed,
        "schema": schema_name,
        "detail": summary,
        "checks": [f.as_dict() for f in found],
    }
    _emit(data, as_json, text)
    if failed:
        sys.exit(1)
    if warned and strict:
        sys.exit(2)


@main.command()
@_where
@click.option("--port", type=click.IntRange(0, 65535), default=9808, show_default=True)
@click.option("--addr", default="0.0.0.0", show_default=True, help="Address to listen on.")
def metrics(
    app_path: str | None, url: str | None, schema: str | None, port: int, addr: str
) -> None:
    """Serve Prometheus metrics of the queues, consumers and tables at /metrics."""
    try:
        from prometheus_client import start_http_server
    except ImportError:
        raise click.ClickException(
            "the metrics need prometheus_client: pip install 'celery-pgnotify[metrics]'"
        ) from None
    import time

    from celery_pgnotify.metrics import Collector, registry

    conninfo, schema_name = _settings(app_path, url, schema)
    collector = Collector(conninfo, schema_name)
    start_http_server(port, addr, registry=registry(collector))
    click.echo(f"serving the metrics of schema {schema_name!r} on http://{addr}:{port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        collector.close()


def _interrupted(*_: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a server as Ctrl-C does


@main.command()
@_where
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--addr",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (the page shows queue names and task arguments).",
)
@click.option(
    "--token",
    envvar="PGNOTIFY_DASHBOARD_TOKEN",
    help="Allow changes (retry, drop, purge, pause) to whoever gives this token "
    "[env PGNOTIFY_DASHBOARD_TOKEN]. Without it the page is read-only.",
)
@click.option(
    "--changes", is_flag=True, help="Allow changes with a token made up now, printed in the URL."
)
def dashboard(
    app_path: str | None,
    url: str | None,
    schema: str | None,
    port: int,
    addr: str,
    token: str | None,
    changes: bool,
) -> None:
    """Serve a web page of the queues, consumers and dead letters."""
    import secrets
    import signal

    from celery_pgnotify.dashboard import Dashboard, serve

    conninfo, schema_name = _settings(app_path, url, schema)
    if changes and not token:
        token = secrets.token_urlsafe(24)
    board = Dashboard(conninfo, schema_name, token=token)
    try:
        server = serve(board, addr, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {addr}:{port}: {exc}") from None
    board.start()
    signal.signal(signal.SIGTERM, _interrupted)
    address = f"http://{addr}:{server.server_port}/"
    if token and changes:
        address += f"#token={token}"
    click.echo(f"dashboard of schema {schema_name!r}: {address}")
    click.echo("changes allowed with the token" if token else "read-only (no --token)")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        board.stop()


def _process(what: str) -> Callable[[Any], Any]:
    """The options every long-running command shares: the app, logging, a pidfile."""

    def apply(function: Any) -> Any:
        for option in reversed(
            [
                click.option(
                    "-A", "--app", "app_path", required=True, help="The Celery app (module[:attr])."
                ),
                click.option("-l", "--loglevel", default="INFO"),
                click.option(
                    "-S",
                    "--scheduler",
                    help="Beat scheduler class (default: the PostgreSQL one, unless "
                    "beat_scheduler is set).",
                ),
                click.option(
                    "--logfile", type=click.Path(dir_okay=False), help="Log to this file."
                ),
                click.option(
                    "--pidfile",
                    type=click.Path(dir_okay=False),
                    help=f"Write the {what} process id here; refuse to start if it is in use.",
                ),
            ]
        ):
            function = option(function)
        return function

    return apply


# The pool's limits: each overrides the Celery setting it names.
_POOL_LIMITS: list[tuple[str, Any, str]] = [
    (
        "--max-tasks-per-child",
        click.IntRange(min=0),
        "Replace a child after this many tasks (worker_max_tasks_per_child).",
    ),
    (
        "--prefetch-multiplier",
        click.IntRange(min=1),
        "Messages waiting in the manager per child (default 16, or the app's "
        "worker_prefetch_multiplier when it is not Celery's default 4).",
    ),
    (
        "--max-memory-per-child",
        click.IntRange(min=0),
        "Replace a child after a task leaves it above this resident memory, in KiB "
        "(worker_max_memory_per_child).",
    ),
    (
        "--max-lifetime-per-child",
        click.FloatRange(min=0),
        "Replace a child once it is older than this many seconds, after its current "
        "task (pgnotify_max_lifetime_per_child).",
    ),
    (
        "--time-limit",
        click.FloatRange(min=0),
        "Hard limit, seconds (task_time_limit): SIGUSR1, then SIGKILL after a grace period.",
    ),
    (
        "--soft-time-limit",
        click.FloatRange(min=0),
        "Soft limit, seconds (task_soft_time_limit): SoftTimeLimitExceeded inside the task.",
    ),
]


def _pool_limits(function: Any) -> Any:
    for name, kind, text in reversed(_POOL_LIMITS):
        function = click.option(name, type=kind, help=text)(function)
    return function


@main.command(context_settings={"show_default": True})
@_process("main")
@click.option("-Q", "--queues", help="Comma-separated queues (default: the app's task queues).")
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Pool children (default: worker_concurrency, else the number of CPUs).",
)
@click.option("-n", "--hostname", help="Node name (default: celery@HOST).")
@_pool_limits
@click.option(
    "-E",
    "--task-events",
    is_flag=True,
    help="Send task and worker events (worker_send_task_events), for Flower.",
)
@click.option("--autoscale", metavar="MAX,MIN", help="Scale the pool between MIN and MAX children.")
@click.option(
    "-B",
    "--beat",
    is_flag=True,
    help="Also run Celery beat (the app's beat_schedule) in this process.",
)
@click.option(
    "-s",
    "--schedule",
    type=click.Path(dir_okay=False),
    help="Beat's schedule file (beat_schedule_filename).",
)
@click.option(
    "--start-method",
    type=click.Choice(["fork", "forkserver", "spawn"]),
    default="fork",
    help="How pool children are started.",
)
def worker(**options: Any) -> None:
    """Run tasks: `celery -A proj worker` becomes `celery-pg worker -A proj`."""
    from celery_pgnotify.worker.main import WorkerOptions, run_worker

    run_worker(WorkerOptions(**options))


@main.command(context_settings={"show_default": True})
@_process("beat")
@click.option(
    "--max-interval",
    type=click.FloatRange(min=0.1),
    help="Longest sleep between checks of the schedule, seconds.",
)
def beat(
    app_path: str,
    loglevel: str,
    scheduler: str | None,
    max_interval: float | None,
    logfile: str | None,
    pidfile: str | None,
) -> None:
    """Run the app's beat_schedule; start as many as you like, one fires."""
    from celery.app.utils import find_app
    from celery.apps.beat import Beat

    from celery_pgnotify.beat import scheduler_for

    app = find_app(app_path)
    Beat(
        app=app,
        loglevel=loglevel,
        logfile=logfile,
        pidfile=pidfile,
        scheduler=scheduler_for(app, scheduler),
        max_interval=max_interval,
    ).run()


if __name__ == "__main__":
    sys.exit(main())
