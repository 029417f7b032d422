"""What makes a task message acceptable to ``celery-pg worker``.

The transport already refused what no consumer can read (see
:mod:`celery_pgnotify.envelope`); here the body is decoded and checked
against the app's ``accept_content``. A refusal says why, in words an
operator can act on; the manager dead-letters the message with that reason.
"""

from __future__ import annotations

from typing import Any

from celery_pgnotify.envelope import Refused, check_task_headers

__all__ = ["Refused", "check_task_headers", "decode_body"]


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
