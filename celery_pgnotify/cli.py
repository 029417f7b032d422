"""The ``celery-pg`` command line."""

from __future__ import annotations

import logging
import sys
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


@click.group()
def main() -> None:
    """celery-pgnotify: Celery on PostgreSQL alone."""


@main.command()
@_app_option
@_url_option
@_schema_option
def migrate(app_path: str | None, url: str | None, schema: str | None) -> None:
    """Create or upgrade the schema (idempotent; safe to run concurrently)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from celery_pgnotify import sql
    from celery_pgnotify.connect import connect

    conninfo, schema_name = _settings(app_path, url, schema)
    with connect(conninfo) as conn:
        applied = sql.migrate(conn, schema_name)
        version = sql.schema_version(conn, schema_name)
    if applied:
        click.echo(
            f"schema {schema_name}: applied {', '.join(map(str, applied))}; "
            f"now at version {version}"
        )
    else:
        click.echo(f"schema {schema_name}: up to date at version {version}")


@main.command(context_settings={"show_default": True})
@click.option("-A", "--app", "app_path", required=True, help="The Celery app (module[:attr]).")
@click.option("-Q", "--queues", help="Comma-separated queues (default: the app's task queues).")
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="Pool children (default: worker_concurrency, else the number of CPUs).",
)
@click.option("-l", "--loglevel", default="INFO")
@click.option("-n", "--hostname", help="Node name (default: celery@HOST).")
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=0),
    help="Replace a child after this many tasks (worker_max_tasks_per_child).",
)
@click.option(
    "--prefetch-multiplier",
    type=click.IntRange(min=1),
    help="Messages waiting in the manager per child (default 16, or the "
    "app's worker_prefetch_multiplier when it is not Celery's default 4).",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=0),
    help="Replace a child after a task leaves it above this resident memory, in KiB "
    "(worker_max_memory_per_child).",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0),
    help="Hard limit, seconds (task_time_limit): SIGUSR1, then SIGKILL after a grace period.",
)
@click.option(
    "--soft-time-limit",
    type=click.FloatRange(min=0),
    help="Soft limit, seconds (task_soft_time_limit): SoftTimeLimitExceeded inside the task.",
)
@click.option(
    "-E",
    "--task-events",
    is_flag=True,
    default=False,
    help="Send task and worker events (worker_send_task_events), for Flower.",
)
@click.option(
    "--autoscale",
    metavar="MAX,MIN",
    help="Scale the pool between MIN and MAX children by demand.",
)
@click.option(
    "-B",
    "--beat",
    is_flag=True,
    default=False,
    help="Also run Celery beat (the app's beat_schedule) in this process.",
)
@click.option(
    "-s",
    "--schedule",
    type=click.Path(dir_okay=False),
    help="Beat's schedule file (beat_schedule_filename).",
)
@click.option(
    "-S",
    "--scheduler",
    help="Beat scheduler class (default: the PostgreSQL one, unless beat_scheduler is set).",
)
@click.option(
    "--start-method",
    type=click.Choice(["fork", "forkserver", "spawn"]),
    default="fork",
    help="How pool children are started.",
)
@click.option("--logfile", type=click.Path(dir_okay=False), help="Log to this file.")
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False),
    help="Write the main process id here; refuse to start if it is in use.",
)
def worker(**options: Any) -> None:
    """Run tasks: `celery -A proj worker` becomes `celery-pg worker -A proj`."""
    from celery_pgnotify.worker.main import WorkerOptions, run_worker

    run_worker(WorkerOptions(**options))


@main.command(context_settings={"show_default": True})
@click.option("-A", "--app", "app_path", required=True, help="The Celery app (module[:attr]).")
@click.option("-l", "--loglevel", default="INFO")
@click.option(
    "-S",
    "--scheduler",
    help="Scheduler class (default: the PostgreSQL one, unless beat_scheduler is set).",
)
@click.option(
    "--max-interval",
    type=click.FloatRange(min=0.1),
    help="Longest sleep between checks of the schedule, seconds.",
)
@click.option("--logfile", type=click.Path(dir_okay=False), help="Log to this file.")
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False),
    help="Write the process id here; refuse to start if it is in use.",
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
