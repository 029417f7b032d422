"""The PostgreSQL beat scheduler: state, catch-up, one firing across processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from celery import Celery
from celery.schedules import crontab, solar
from kombu import Connection, Exchange, Queue

from celery_pgnotify.beat import Scheduler, scheduler_for
from celery_pgnotify.errors import ConfigurationError
from tests.workers import close_app


class Beats:
    """Schedulers on one schema, each with its own app, as separate processes would be."""

    def __init__(self, broker_url: str, schema: str, db: psycopg.Connection[Any]) -> None:
        self.broker_url = broker_url
        self.schema = schema
        self.db = db
        self.apps: list[Celery] = []
        self.schedulers: list[Scheduler] = []
        with Connection(broker_url, transport_options={"schema": schema}) as conn:
            Queue("celery", Exchange("celery"), "celery")(conn.default_channel).declare()

    def start(self, schedule: dict[str, Any], **conf: Any) -> Scheduler:
        app = Celery("beat-test", broker=self.broker_url, set_as_current=False)
        app.conf.broker_transport_options = {"schema": self.schema}
        app.conf.beat_schedule = schedule
        app.conf.result_expires = None  # no celery.backend_cleanup entry
        app.conf.update(conf)
        self.apps.append(app)
        scheduler = Scheduler(app=app)
        self.schedulers.append(scheduler)
        return scheduler

    def messages(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            f'SELECT payload FROM "{self.schema}".messages ORDER BY id'
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def state(self, name: str) -> tuple[Any, ...]:
        row = self.db.execute(
            f"SELECT schedule, last_run_at, last_due_at, total_run_count"
            f' FROM "{self.schema}".beat_entries WHERE name = %s',
            (name,),
        ).fetchone()
        assert row is not None
        return tuple(row)

    def set_last_run(self, name: str, ago: timedelta) -> None:
        self.db.execute(
            f'UPDATE "{self.schema}".beat_entries SET last_run_at = now() - %s WHERE name = %s',
            (ago, name),
        )

    def restart_overdue(
        self, schedule: dict[str, Any], name: str, ago: timedelta, **conf: Any
    ) -> Scheduler:
        """Register ``schedule``, stop, backdate ``name``'s last run by ``ago``
        (as if beat had been down), and start again: the restarted scheduler."""
        first = self.start(schedule, **conf)
        self.set_last_run(name, ago)
        first.close()
        return self.start(schedule, **conf)

    def close(self) -> None:
        for scheduler in self.schedulers:
            scheduler.close()
        for app in self.apps:
            close_app(app)


@pytest.fixture
def beats(broker_url: str, schema: str, db: psycopg.Connection[Any]) -> Iterator[Beats]:
    env = Beats(broker_url, schema, db)
    yield env
    env.close()


EVERY_MINUTE = {"task": "tests.beat.ping", "schedule": timedelta(minutes=1), "args": ("m",)}


def test_overdue_entry_fires_once_and_counts_from_now(beats: Beats) -> None:
    s = beats.start({"ping": EVERY_MINUTE})
    assert s.tick() > 0  # registered, not due: new entries wait one interval (Celery's rule)
    assert beats.messages() == []
    beats.set_last_run("ping", timedelta(minutes=10))  # beat was down for ten runs
    s2 = beats.start({"ping": EVERY_MINUTE})  # a restart
    s.close()
    s2.tick()
    s2.tick()
    sent = beats.messages()
    assert len(sent) == 1, "missed runs are not replayed one by one"
    assert sent[0]["headers"]["task"] == "tests.beat.ping"
    _, last_run, _, count = beats.state("ping")
    assert count == 1
    assert abs((datetime.now(timezone.utc) - last_run).total_seconds()) < 5


def test_restart_does_not_fire_an_entry_that_is_not_due(beats: Beats) -> None:
    s = beats.restart_overdue({"ping": EVERY_MINUTE}, "ping", timedelta(seconds=61))
    s.tick()
    assert len(beats.messages()) == 1
    s.close()
    for _ in range(2):  # restarted twice more, right after the firing
        s = beats.start({"ping": EVERY_MINUTE})
        s.tick()
        s.close()
    assert len(beats.messages()) == 1
    assert beats.state("ping")[3] == 1


def test_interval_cadence_is_kept(beats: Beats) -> None:
    """While on time, the next run counts from the due time, not the firing time."""
    s = beats.start({"ping": {**EVERY_MINUTE, "schedule": 2.0}})
    beats.set_last_run("ping", timedelta(seconds=2.5))
    s2 = beats.start({"ping": {**EVERY_MINUTE, "schedule": 2.0}})
    s.close()
    s2.tick()
    _, last_run, due, _ = beats.state("ping")
    assert last_run == due  # on time: last run is the due instant


def test_crontab_entry(beats: Beats) -> None:
    entry = {"task": "tests.beat.ping", "schedule": crontab(minute="*"), "args": ("c",)}
    s = beats.restart_overdue({"cron": entry}, "cron", timedelta(minutes=3))
    s.tick()
    s.tick()
    assert len(beats.messages()) == 1
    schedule, _, due, count = beats.state("cron")
    assert "crontab" in schedule and count == 1
    assert due.second == 0 and due.microsecond == 0  # a minute boundary


def test_crontab_in_the_apps_timezone(beats: Beats) -> None:
    """*/20 in Kathmandu time (UTC+05:45) is minute 15, 35 or 55 in UTC."""
    entry = {"task": "tests.beat.ping", "schedule": crontab(minute="*/20")}
    beats.restart_overdue(
        {"cron": entry}, "cron", timedelta(minutes=45), timezone="Asia/Kathmandu"
    ).tick()
    _, _, due, count = beats.state("cron")
    assert count == 1
    assert due.astimezone(timezone.utc).minute in (15, 35, 55), due


def test_solar_entry(beats: Beats) -> None:
    pytest.importorskip("ephem", reason="solar schedules need the ephem package")
    entry = {"task": "tests.beat.ping", "schedule": solar("sunrise", 48.85, 2.35)}
    s = beats.restart_overdue({"sun": entry}, "sun", timedelta(days=2))
    s.tick()
    s.tick()
    schedule, _, due, count = beats.state("sun")
    assert "solar" in schedule and count == 1
    assert datetime.now(timezone.utc) - due < timedelta(days=2)
    assert len(beats.messages()) == 1


def test_entry_options_reach_the_message(beats: Beats) -> None:
    with Connection(beats.broker_url, transport_options={"schema": beats.schema}) as conn:
        Queue("reports", Exchange("reports"), "reports")(conn.default_channel).declare()
    entry = {
        **EVERY_MINUTE,
        "kwargs": {"size": 3},
        "options": {"queue": "reports", "priority": 7, "expires": 30},
    }
    beats.restart_overdue({"report": entry}, "report", timedelta(minutes=2)).tick()
    (message,) = beats.messages()
    assert message["properties"]["delivery_info"]["routing_key"] == "reports"
    assert message["properties"]["priority"] == 7
    assert message["headers"]["expires"]
    row = beats.db.execute(f'SELECT queue FROM "{beats.schema}".messages').fetchone()
    assert row == ("reports",)


def test_changed_schedule_on_restart(beats: Beats) -> None:
    s = beats.restart_overdue({"ping": EVERY_MINUTE}, "ping", timedelta(seconds=90))
    s.tick()
    assert len(beats.messages()) == 1
    s.close()
    _, last_run, _, _ = beats.state("ping")

    # Restarted with a longer interval: the recorded last run is kept.
    hourly = {**EVERY_MINUTE, "schedule": timedelta(hours=1)}
    s = beats.start({"ping": hourly, "new": EVERY_MINUTE})
    s.tick()
    schedule, kept_last_run, _, count = beats.state("ping")
    assert "1.00 hour" in schedule and kept_last_run == last_run and count == 1
    assert len(beats.messages()) == 1
    s.close()

    # Restarted with a shorter one than the time since the last run: due now.
    beats.set_last_run("ping", timedelta(seconds=5))
    s = beats.start({"ping": {**EVERY_MINUTE, "schedule": 2.0}})
    s.tick()
    assert len(beats.messages()) == 2
    # The removed entry is forgotten by the leader.
    with pytest.raises(AssertionError):
        beats.state("new")


def test_one_leader_and_takeover(beats: Beats) -> None:
    first = beats.start({"ping": EVERY_MINUTE}, pgnotify_beat_retry=0.2)
    second = beats.start({"ping": EVERY_MINUTE}, pgnotify_beat_retry=0.2)
    first.tick()
    second.tick()
    assert first.leader and not second.leader
    beats.set_last_run("ping", timedelta(minutes=2))
    assert second.tick() == pytest.approx(0.1)  # waits half a lease, fires nothing
    assert beats.messages() == []
    first.close()  # the leader goes away, handing over at once
    second.tick()
    assert second.leader
    assert len(beats.messages()) == 1


def test_two_leaders_cannot_fire_the_same_run_twice(beats: Beats) -> None:
    """Even when leadership is broken (both believe they lead), one firing wins."""
    a = beats.start({"ping": EVERY_MINUTE})
    b = beats.start({"ping": EVERY_MINUTE})
    a.tick()
    beats.set_last_run("ping", timedelta(minutes=2))
    a._register()
    b._register()  # both loaded the same overdue state
    b.leader = True  # split brain: b believes it leads, and will not check soon
    b._renew_at = time.monotonic() + 3600
    a.tick()
    b.tick()
    assert len(beats.messages()) == 1
    assert beats.state("ping")[3] == 1


def test_needs_the_pgnotify_broker() -> None:
    app = Celery("beat-test", broker="redis://localhost:6379/0", set_as_current=False)
    with pytest.raises(ConfigurationError, match="broker_url"):
        Scheduler(app=app)
    assert scheduler_for(app) == "celery.beat:PersistentScheduler"
    app.conf.broker_url = "pgnotify://localhost/db"
    assert scheduler_for(app) == "celery_pgnotify.beat:Scheduler"
    assert scheduler_for(app, "django_celery_beat.schedulers:DatabaseScheduler").startswith(
        "django"
    )
    app.conf.pgnotify_beat_retry = "soon"
    with pytest.raises(ConfigurationError, match="pgnotify_beat_retry"):
        Scheduler(app=app)
    close_app(app)


def test_a_frozen_leader_is_replaced_within_twice_the_lease(beats: Beats) -> None:
    """Leadership is a lease, not a session: a leader that stops renewing
    (frozen, partitioned, or SIGKILLed with children holding its sockets)
    is replaced, and the replacement fires, within 2 x pgnotify_beat_retry."""
    first = beats.start({"ping": EVERY_MINUTE}, pgnotify_beat_retry=0.5)
    second = beats.start({"ping": EVERY_MINUTE}, pgnotify_beat_retry=0.5)
    first.tick()
    assert first.leader
    beats.set_last_run("ping", timedelta(minutes=2))
    frozen_at = time.monotonic()  # first never ticks again
    while not beats.messages() and time.monotonic() - frozen_at < 5:
        time.sleep(second.tick())
    assert second.leader and len(beats.messages()) == 1
    assert time.monotonic() - frozen_at <= 2 * 0.5 + 0.2


def test_a_leader_that_lost_its_lease_fires_nothing(beats: Beats) -> None:
    """The fence: a process still believing it leads after its lease went to
    another (its term is old) cannot fire, even an overdue entry."""
    first = beats.start({"ping": EVERY_MINUTE}, pgnotify_beat_retry=0.3)
    second = beats.start({"ping": EVERY_MINUTE}, pgnotify_beat_retry=0.3)
    first.tick()
    time.sleep(0.4)  # first's lease runs out unrenewed
    second.tick()
    assert second.leader
    beats.set_last_run("ping", timedelta(minutes=2))
    first._register()
    first._renew_at = time.monotonic() + 3600  # it will not check the lease soon
    first.tick()
    assert beats.messages() == []
    second._register()
    second.tick()
    assert len(beats.messages()) == 1


def test_a_publish_that_failed_in_the_database_is_fired_again(beats: Beats) -> None:
    """Celery wraps the failed publish in SchedulingError; the firing's
    transaction rolled back, so the entry is still due and fires next tick."""
    scheduler = beats.start({"ping": EVERY_MINUTE})
    scheduler.tick()
    s = beats.schema
    beats.db.execute(
        f'CREATE SEQUENCE "{s}".fail_once;'
        f'CREATE FUNCTION "{s}".fail_once() RETURNS trigger LANGUAGE plpgsql AS $$'
        " BEGIN IF nextval(" + f"'\"{s}\".fail_once'" + ") = 1 THEN"
        " RAISE EXCEPTION 'no space left on device'; END IF; RETURN NEW; END $$;"
        f'CREATE TRIGGER fail_once BEFORE INSERT ON "{s}".messages'
        f' FOR EACH ROW EXECUTE FUNCTION "{s}".fail_once()'
    )
    beats.set_last_run("ping", timedelta(minutes=2))
    scheduler._register()
    scheduler.tick()  # the publish fails: nothing recorded as fired
    assert beats.messages() == [] and beats.state("ping")[3] == 0
    scheduler.tick()
    assert len(beats.messages()) == 1 and beats.state("ping")[3] == 1
