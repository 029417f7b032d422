"""Run the Django example end to end.

A view creates an order and sends its receipt task in one transaction
(``transaction.atomic()``): a refused payment rolls both back; a good one
commits both, and the task runs after COMMIT and finds the order. A periodic
task edited in the database runs under ``django-celery-beat``'s
DatabaseScheduler. The worker is ``celery-pg worker``; results come back
through the ``pgnotify://`` result backend. The database: see
``examples/database.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from database import database_url  # noqa: E402  (examples/database.py)


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0] if proc.stdout else ""


def main() -> int:
    url, server = database_url()
    schema = os.environ.get("SHOP_SCHEMA", "shop")
    env = dict(os.environ, PGNOTIFY_URL=url, SHOP_SCHEMA=schema, PYTHONPATH=HERE)
    os.environ.update(
        PGNOTIFY_URL=url, SHOP_SCHEMA=schema, DJANGO_SETTINGS_MODULE="shop_site.settings"
    )
    sys.path.insert(0, HERE)
    import psycopg
    from psycopg import sql

    dsn = "postgresql" + url[len("pgnotify") :]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    procs: list[subprocess.Popen[str]] = []
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        from django_celery_beat.models import IntervalSchedule, PeriodicTask

        every_second, _ = IntervalSchedule.objects.get_or_create(
            every=1, period=IntervalSchedule.SECONDS
        )
        PeriodicTask.objects.update_or_create(
            name="heartbeat", defaults={"task": "shop.tasks.heartbeat", "interval": every_second}
        )

        procs.append(
            start(
                [
                    sys.executable,
                    "-m",
                    "celery_pgnotify.cli",
                    "worker",
                    "-A",
                    "shop_site",
                    "-c",
                    "2",
                ],
                env,
            )
        )
        procs.append(
            start([sys.executable, "-m", "celery", "-A", "shop_site", "beat", "-l", "info"], env)
        )

        from celery.result import AsyncResult
        from django.test import Client
        from shop.models import Heartbeat, Order

        client = Client()
        refused = client.post(
            "/orders", json.dumps({"item": "lamp", "fail": True}), "application/json"
        )
        accepted = client.post("/orders", json.dumps({"item": "book"}), "application/json")
        assert refused.status_code == 402 and accepted.status_code == 201, (refused, accepted)
        order_id, task_id = accepted.json()["order"], accepted.json()["task"]
        receipt = AsyncResult(task_id).get(timeout=60)
        print(f"order {order_id} committed -> {receipt}")
        time.sleep(1)  # a second run, were there one, would show by now
        receipts = Order.objects.get(pk=order_id).receipts
        assert receipts == 1, f"the receipt task ran {receipts} times"
        assert not Order.objects.filter(item="lamp").exists()
        refused_task = refused.json()["task"]
        with psycopg.connect(dsn) as conn:
            query = sql.SQL("SELECT count(*) FROM {}.messages WHERE payload LIKE %s")
            (left,) = conn.execute(
                query.format(sql.Identifier(f"{schema}_celery")), (f"%{refused_task}%",)
            ).fetchone()
        assert left == 0 and AsyncResult(refused_task).state == "PENDING"
        print("refused order rolled back -> no order, and its receipt task never existed")

        deadline = time.monotonic() + 30
        while Heartbeat.objects.count() < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        beats = Heartbeat.objects.count()
        print(f"django-celery-beat periodic task fired {beats} times")
        if beats < 2:
            return 1
        from django.db import connection

        connection.close()
        print("Django example OK: transactional enqueue, result backend and django-celery-beat.")
        return 0
    finally:
        for proc in procs:
            output = stop(proc)
            if os.environ.get("EXAMPLE_VERBOSE"):
                print(output)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name in (schema, f"{schema}_celery"):
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
                )
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
