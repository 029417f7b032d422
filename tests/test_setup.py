"""Selecting the transport, connection settings and the schema."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_pgnotify import migrations
from celery_pgnotify.connect import conninfo_from_url, mask_url
from celery_pgnotify.errors import ConfigurationError
from tests.test_transport import collect, drain_until


def _fresh_interpreter(code: str) -> list[str]:
    """The lines ``code`` prints in a new interpreter (the .pth hook active)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_scheme_is_known_to_a_process_that_never_imports_the_package(broker_url):
    # Only kombu is imported: the .pth hook must make the scheme resolve.
    code = (
        "import sys\n"
        "from kombu import Connection\n"
        f"c = Connection({broker_url!r})\n"
        "print(type(c.transport).__module__)\n"
        "print('celery_pgnotify' in sys.modules)\n"
    )
    assert _fresh_interpreter(code) == ["celery_pgnotify.transport", "True"]


@pytest.mark.parametrize(
    "first", ["kombu.transport", "celery.worker.control"], ids=["kombu_first", "celery_first"]
)
def test_the_pth_hook_serves_both_modules_in_either_order(first: str) -> None:
    """The hook adds the ``pgnotify`` alias to kombu and this broker's
    remote-control commands to Celery's registry (which ``celery control``
    checks), whichever of the two a process imports first."""
    second = "celery.worker.control" if first == "kombu.transport" else "kombu.transport"
    code = (
        f"import {first}\n"
        f"import {second}\n"
        "from kombu.transport import TRANSPORT_ALIASES\n"
        "from celery.worker.control import Panel\n"
        "print(TRANSPORT_ALIASES.get('pgnotify'))\n"
        "print(sorted(n for n in ('pause_queue', 'resume_queue') if n in Panel.meta))\n"
    )
    assert _fresh_interpreter(code) == [
        "celery_pgnotify.transport:Transport",
        "['pause_queue', 'resume_queue']",
    ]


def test_interpreter_start_does_not_import_kombu():
    code = "import sys; print('kombu' in sys.modules, 'celery_pgnotify' in sys.modules)"
    assert _fresh_interpreter(code) == ["False False"]


def test_dsn_transport_option_overrides_the_url(pg_dsn, schema):
    # The URL points nowhere; the DSN option is what gets used.
    conn = Connection(
        "pgnotify://nobody@127.0.0.1:1/nowhere", transport_options={"schema": schema, "dsn": pg_dsn}
    )
    queue = Queue("dsn", Exchange("dsn"), routing_key="dsn")
    received: list[Any] = []
    with conn:
        Producer(conn).publish(
            "via dsn", exchange=queue.exchange, routing_key="dsn", declare=[queue]
        )
        with Consumer(conn, [queue], callbacks=[collect(received)]):
            drain_until(conn, received, 1)
    assert received[0][0] == "via dsn"


def test_libpq_options_in_the_url_pass_through():
    info = conninfo_from_url(
        "pgnotify://u:p@db:6432/app?sslmode=require&target_session_attrs=any", None, 10
    )
    params = psycopg.conninfo.conninfo_to_dict(info)
    assert params["sslmode"] == "require"
    assert params["target_session_attrs"] == "any"
    assert (params["host"], params["port"], params["dbname"]) == ("db", "6432", "app")
    assert params["keepalives"] == "1"


def test_password_is_masked_in_the_uri_celery_prints():
    assert mask_url("pgnotify://u:secret@h:5432/db") == "pgnotify://u:**@h:5432/db"
    conn = Connection("pgnotify://u:secret@h:5432/db")
    assert "secret" not in conn.as_uri()


def test_unknown_scheme_in_dsn_is_refused():
    with pytest.raises(ConfigurationError, match="dsn"):
        conninfo_from_url("pgnotify://h/db", "mysql://h/db", 10)


def test_connection_errors_are_kombu_recoverable(broker_url):
    conn = Connection(
        "pgnotify://postgres@127.0.0.1:1/none", transport_options={"connect_timeout": 1}
    )
    assert psycopg.OperationalError in conn.connection_errors
    with pytest.raises(conn.connection_errors):
        conn.connect()


def test_cli_migrate_is_idempotent(broker_url, pg_dsn, schema):
    cmd = [
        sys.executable,
        "-m",
        "celery_pgnotify.cli",
        "migrate",
        "--url",
        broker_url,
        "--schema",
        schema,
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"applied {migrations.LATEST_VERSION}" in first or "applied 1" in first
    assert "up to date" in second
    with psycopg.connect(pg_dsn) as conn:
        assert migrations.schema_version(conn, schema) == migrations.LATEST_VERSION


def test_newer_schema_than_the_package_is_refused(pg_dsn, schema):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrations.migrate(conn, schema)
        conn.execute(f'INSERT INTO "{schema}".schema_version (version) VALUES (9999)')
        with pytest.raises(migrations.SchemaError, match="newer"):
            migrations.migrate(conn, schema)


def test_hostile_url_parameters_stay_values():
    """Quotes and spaces in a URL cannot add or change connection parameters."""
    conninfo = conninfo_from_url(
        "pgnotify://u:p%27w%20host%3Devil@db:5432/app?application_name=a%27%20host%3Devil", None, 10
    )
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    assert params["host"] == "db" and params["dbname"] == "app"
    assert params["password"] == "p'w host=evil"
    assert params["application_name"] == "a' host=evil"
