"""Setting up ``celery-pg worker`` from its options and the app's settings."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from celery_pgnotify.errors import ConfigurationError
from celery_pgnotify.options import AppSettings
from celery_pgnotify.worker.manager import Manager
from celery_pgnotify.worker.pool import PoolSettings

logger = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    """The command line, before the app's own settings fill the gaps."""

    app_path: str
    queues: str | None = None
    concurrency: int | None = None
    loglevel: str = "INFO"
    hostname: str | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    max_lifetime_per_child: float | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    prefetch_multiplier: int | None = None
    start_method: str = "fork"
    logfile: str | None = None
    pidfile: str | None = None
    task_events: bool = False
    beat: bool = False
    autoscale: str | None = None
    schedule: str | None = None
    scheduler: str | None = None


def _nodename(hostname: str | None) -> str:
    from celery.utils.nodenames import default_nodename, host_format

    # As `celery worker -n`: default celery@HOST; %h, %n, %d expand.
    return str(host_format(default_nodename(hostname)))


def _autoscale(value: str | None) -> tuple[int, int] | None:
    """``MAX,MIN`` (MIN defaults to 0, as in Celery; at least 1 child here)."""
    if not value:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        most = int(parts[0])
        least = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    except ValueError:
        raise ConfigurationError("--autoscale", f"expected MAX,MIN, not {value!r}") from None
    if most < 1 or least < 0 or least > most:
        raise ConfigurationError("--autoscale", f"need 1 <= MAX and 0 <= MIN <= MAX: {value!r}")
    return most, max(1, least)


def _task_queues(app: Any, names: str | None) -> list[Any]:
    queues = app.amqp.queues
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        if not wanted:
            raise ConfigurationError("-Q/--queues", "no queue name given")
        queues.select(wanted)
    return list(queues.consume_from.values())


#: Default messages per child held in the manager. Unlike Celery's prefork
#: pool, only messages not yet started count against this window (a task a
#: child has taken is acked, unless acks_late), so a wider window costs no
#: fairness and lets claims and acks travel in bigger batches.
DEFAULT_PREFETCH_MULTIPLIER = 16


CELERY_DEFAULT_PREFETCH_MULTIPLIER = 4


def _prefetch_multiplier(conf: Any) -> int:
    # A project that changed worker_prefetch_multiplier (often to 1, for long
    # tasks) keeps its value; Celery's untouched default becomes ours.
    value = int(conf.worker_prefetch_multiplier or CELERY_DEFAULT_PREFETCH_MULTIPLIER)
    if value != CELERY_DEFAULT_PREFETCH_MULTIPLIER:
        return max(1, value)
    return DEFAULT_PREFETCH_MULTIPLIER


def run_worker(options: WorkerOptions) -> None:
    """Build the manager for ``options`` and run it until shut down."""
    from celery import platforms
    from celery.app.utils import find_app

    app = find_app(options.app_path)
    conf = app.conf
    own = AppSettings.from_conf(conf)  # the pgnotify_* settings, validated once
    loglevel = options.loglevel.upper()
    app.log.setup(loglevel=loglevel, logfile=options.logfile, redirect_stdouts=False)
    app.loader.init_worker()
    app.finalize()
    # Celery's worker sends worker_init before it starts its pool; handlers
    # rely on it (Django's fixup closes inherited database connections in
    # pool children and after each task once it has run).
    from celery import signals

    signals.worker_init.send(sender=None)
    pidlock = platforms.create_pidlock(options.pidfile) if options.pidfile else None
    autoscale = _autoscale(options.autoscale)
    concurrency = options.concurrency or conf.worker_concurrency or os.cpu_count() or 1
    if autoscale is not None:
        concurrency = autoscale[1]
    multiplier = options.prefetch_multiplier or _prefetch_multiplier(conf)
    max_tasks = options.max_tasks_per_child
    if max_tasks is None:
        max_tasks = conf.worker_max_tasks_per_child or 0
    if options.time_limit is not None:
        conf.task_time_limit = options.time_limit
    if options.soft_time_limit is not None:
        conf.task_soft_time_limit = options.soft_time_limit
    max_memory = options.max_memory_per_child
    if max_memory is None:
        max_memory = conf.worker_max_memory_per_child or 0
    hostname = _nodename(options.hostname)
    settings = PoolSettings(
        app_path=options.app_path,
        concurrency=concurrency,
        max_tasks_per_child=max_tasks,
        max_memory_per_child=max_memory,
        max_lifetime=(
            own.max_lifetime_per_child
            if options.max_lifetime_per_child is None
            else options.max_lifetime_per_child
        ),
        start_method=options.start_method,
        loglevel=loglevel,
        logfile=options.logfile,
        hostname=hostname,
    )
    queues = _task_queues(app, options.queues)
    # The window is sized for the most children the pool may have.
    window = (autoscale[0] if autoscale else concurrency) * multiplier
    logger.info(
        "celery-pg worker %s: app %s, broker %s, concurrency %d (%s), queues %s",
        hostname,
        app.main or options.app_path,
        app.connection_for_read().as_uri(),
        concurrency,
        options.start_method,
        ", ".join(q.name for q in queues),
    )
    try:
        send_events = options.task_events or bool(conf.worker_send_task_events)
        beat = None
        if options.beat:
            from celery.beat import EmbeddedService

            from celery_pgnotify.beat import scheduler_for

            # Celery's beat service in a thread of the main process (as -B),
            # with the PostgreSQL scheduler unless another is configured.
            beat = EmbeddedService(
                app,
                thread=True,
                schedule_filename=options.schedule or conf.beat_schedule_filename,
                scheduler_cls=scheduler_for(app, options.scheduler),
            )
        Manager(
            app,
            queues,
            settings,
            hostname,
            window,
            send_events=send_events,
            beat=beat,
            autoscale=autoscale,
            own=own,
        ).start()
    finally:
        if pidlock is not None:
            pidlock.release()
