"""What makes a task message acceptable to ``celery-pg worker``.

Each check returns the reason a message is refused, in words an operator
can act on; the manager dead-letters the message with that reason.
"""

from __future__ import annotations

from datetime import datetime
from numbers import Real
from typing import Any

MAX_NAME = 1000


class Refused(Exception):
    """The message cannot be run; ``str(exc)`` says why."""


def _text(headers: dict[str, Any], key: str, required: bool = False) -> None:
    value = headers.get(key)
    if value is None:
        if required:
            raise Refused(f"not a Celery task message: no {key!r} header")
        return
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or "\x00" in value:
        raise Refused(f"invalid header {key!r}: {value!r:.100}")


def _time(headers: dict[str, Any], key: str) -> None:
    value = headers.get(key)
    if value is None or (isinstance(value, Real) and not isinstance(value, bool)):
        return
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
            return
        except ValueError:
            pass
    raise Refused(f"invalid header {key!r}: {value!r:.100} is not an ISO 8601 time")


def check_headers(headers: Any) -> None:
    """Raise :class:`Refused` unless ``headers`` are a usable Celery (protocol 2) set."""
    if not isinstance(headers, dict):
        raise Refused("not a Celery task message: no headers")
    _text(headers, "task", required=True)
    _text(headers, "id", required=True)
    for key in ("root_id", "parent_id", "group", "shadow"):
        _text(headers, key)
    _time(headers, "eta")
    _time(headers, "expires")
    retries = headers.get("retries")
    if retries is not None and (
        not isinstance(retries, int) or isinstance(retries, bool) or retries < 0
    ):
        raise Refused(f"invalid header 'retries': {retries!r:.100}")
    limits = headers.get("timelimit")
    if limits is not None and (
        not isinstance(limits, (list, tuple))
        or len(limits) != 2
        or any(
            x is not None and (not isinstance(x, Real) or isinstance(x, bool) or x < 0)
            for x in limits
        )
    ):
        raise Refused(f"invalid header 'timelimit': {limits!r:.100}")


def decode_body(message: Any, accept: set[str]) -> tuple[Any, Any, Any]:
    """``(args, kwargs, embed)`` of a protocol 2 body, or :class:`Refused`."""
    from kombu.serialization import loads

    content_type = message.content_type
    if content_type not in accept:
        raise Refused(
            f"content type {content_type!r} is not accepted (accept_content: "
            f"{', '.join(sorted(accept))})"
        )
    try:
        decoded = loads(  # type: ignore[no-untyped-call]
            message.body, content_type, message.content_encoding, accept=accept
        )
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the same
        raise Refused(f"malformed body: {exc!r:.300}") from None
    if not isinstance(decoded, (list, tuple)) or len(decoded) != 3:
        raise Refused("malformed body: not [args, kwargs, embed] (Celery message protocol 2)")
    args, kwargs, embed = decoded
    if not isinstance(args, (list, tuple)):
        raise Refused(f"malformed body: args is {type(args).__name__}, not a list")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise Refused("malformed body: kwargs is not a mapping of names")
    if embed is not None and not isinstance(embed, dict):
        raise Refused(f"malformed body: embed is {type(embed).__name__}, not a mapping")
    return args, kwargs, embed or {}
