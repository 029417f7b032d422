"""Shared by tests/ and compat_tests/: the PostgreSQL fixtures."""

pytest_plugins = ["tests.pgserver"]
