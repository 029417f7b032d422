"""Settings of the example shop: Django and Celery share one PostgreSQL."""

import os
from urllib.parse import unquote, urlsplit

URL = os.environ.get("PGNOTIFY_URL", "pgnotify://postgres@127.0.0.1:5432/postgres")
SCHEMA = os.environ.get("SHOP_SCHEMA", "shop")
_db = urlsplit(URL)

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "shop_site.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django_celery_beat", "shop"]
MIDDLEWARE: list[str] = []

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # on psycopg 3
        "NAME": _db.path.lstrip("/") or "postgres",
        "USER": unquote(_db.username or ""),
        "PASSWORD": unquote(_db.password or ""),
        "HOST": _db.hostname or "",
        "PORT": _db.port or "",
        # The example's tables live in their own schema.
        "OPTIONS": {"options": f"-c search_path={SCHEMA}"},
    }
}

# The only broker line: PostgreSQL, the same database.
CELERY_BROKER_URL = URL
CELERY_RESULT_BACKEND = URL
CELERY_BROKER_TRANSPORT_OPTIONS = {"schema": f"{SCHEMA}_celery"}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Periodic tasks edited in the database (django-celery-beat's admin or ORM).
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
