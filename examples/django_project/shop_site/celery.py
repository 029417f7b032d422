"""The project's Celery app: settings come from Django's (CELERY_ prefix)."""

import os

from celery import Celery

from celery_pgnotify.django import enqueue_in_atomic_blocks

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_site.settings")

app = Celery("shop_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Tasks sent inside transaction.atomic() commit or roll back with it.
enqueue_in_atomic_blocks()
