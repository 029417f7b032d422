"""A plain Celery project. The broker and the result backend: one PostgreSQL."""

import os

from celery import Celery

app = Celery("proj", include=["proj.tasks"])
app.conf.broker_url = os.environ.get("PGNOTIFY_URL", "pgnotify://postgres@127.0.0.1:5432/postgres")
app.conf.result_backend = app.conf.broker_url
app.conf.beat_schedule = {
    "heartbeat-every-2s": {"task": "proj.tasks.heartbeat", "schedule": 2.0},
}
