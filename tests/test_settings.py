"""Every setting is declared once (options.py): the README's tables are that
declaration, and every value is checked where it is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from celery_pgnotify.errors import ConfigurationError
from celery_pgnotify.options import AppSettings, TransportOptions, markdown_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.parametrize(
    ("declaration", "prefix"), [(TransportOptions, ""), (AppSettings, "pgnotify_")]
)
def test_the_readme_tables_are_the_declarations(declaration, prefix):
    table = markdown_table(declaration, prefix)
    assert table in README, f"README out of date; its table should read:\n{table}"


def _conf(**settings):
    app = Celery("settings", set_as_current=False)
    app.conf.update(settings)
    return app.conf


def test_app_settings_take_their_defaults_and_values():
    assert AppSettings.from_conf(_conf()) == AppSettings()
    own = AppSettings.from_conf(_conf(pgnotify_cancel_grace="2.5", pgnotify_beat_retry=3))
    assert own.cancel_grace == 2.5 and own.beat_retry == 3.0


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("pgnotify_beat_retry", "soon", "must be a number"),
        ("pgnotify_beat_retry", 0, "positive"),
        ("pgnotify_cancel_grace", -1, "negative"),
        ("pgnotify_autoscale_keepalive", True, "must be a number"),
        ("pgnotify_max_lifetime_per_child", [1], "must be a number"),
    ],
)
def test_a_bad_app_setting_raises_an_error_naming_it(name, value, says):
    with pytest.raises(ConfigurationError, match=name) as caught:
        AppSettings.from_conf(_conf(**{name: value}))
    assert says in str(caught.value)


def test_a_bad_transport_option_raises_an_error_naming_it():
    with pytest.raises(ConfigurationError, match=r"broker_transport_options\['claim_batch'\]"):
        TransportOptions.from_mapping({"claim_batch": "many"})
    # PostgreSQL refuses to create it (a reserved prefix): said before connecting.
    with pytest.raises(ConfigurationError, match=r"broker_transport_options\['schema'\].*pg_"):
        TransportOptions.from_mapping({"schema": "pg_queues"})
    assert TransportOptions.from_mapping({"schema": "PG_queues"}).schema == "PG_queues"
