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
        from celery.utils.imports import find_app

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
@click.option("-l", "--loglevel", default="INFO", show_default=True)
def main(loglevel: str) -> None:
    """celery-pgnotify: Celery on PostgreSQL alone."""
    logging.basicConfig(level=loglevel.upper(), format="%(levelname)s %(message)s")


@main.command()
@_app_option
@_url_option
@_schema_option
def migrate(app_path: str | None, url: str | None, schema: str | None) -> None:
    """Create or upgrade the schema (idempotent; safe to run concurrently)."""
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


if __name__ == "__main__":
    sys.exit(main())
