"""Each example runs end to end, as the README tells a new user to run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.e2e


def test_quickstart_runs_end_to_end(broker_url):
    env = dict(os.environ, PGNOTIFY_URL=broker_url)
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart", "run.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Quickstart OK" in done.stdout
    assert "mul(6, 7), countdown 1 s     -> 42" in done.stdout
    assert "chain add(1, 2) | mul(10)    -> 30" in done.stdout
    assert "chord of add(i, i) -> total  -> 20" in done.stdout


def test_django_project_runs_end_to_end(broker_url, schema):
    env = dict(os.environ, PGNOTIFY_URL=broker_url, SHOP_SCHEMA=schema)
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "django_project", "run.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Django example OK" in done.stdout
    assert "committed -> receipt for order" in done.stdout
