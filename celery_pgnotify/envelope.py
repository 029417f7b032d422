"""What a stored message must be for a consumer to be given it, and how a
published one is written (:func:`dumps`).

Rows reach the messages table from kombu producers, from the ``send_task``
SQL function, and from any service or person with INSERT rights: their text
is input, never trusted. Every claimed row is read by :func:`parse`, which
returns the message kombu will build a ``Message`` from, or raises
:class:`Refused` with the reason, in words an operator can act on; the
transport then moves the row to ``dead_letters`` with that reason, and the
rest of the batch is delivered as usual. So nothing a row holds can make a
claim, kombu's ``Message()`` or a worker's first look at the headers raise.

The checks cover the envelope (kombu's keys and their types, the body's
encoding) and, for Celery task messages (protocol 2: a ``task`` header),
the headers both workers read before running anything (names, ids, times,
time limits, retries).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timedelta, timezone
from numbers import Real
from typing import Any

logger = logging.getLogger(__name__)

#: Longest task name, id or other name-like header accepted.
MAX_NAME = 1000

#: Longest time limit accepted, in seconds (about 31 years): timers take no more.
MAX_TIME_LIMIT = 1e9


class Refused(Exception):
    """The message cannot be delivered or run; ``str(exc)`` says why."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _loads(payload: str) -> Any:
    try:
        return _DECODER.decode(payload)
    except RecursionError:
        raise Refused("not JSON: nested too deeply") from None
    except ValueError as exc:  # includes integers longer than Python converts
        raise Refused(f"not JSON: {exc}") from None


def _optional_str(mapping: dict[str, Any], key: str, where: str) -> None:
    value = mapping.get(key)
    if value is not None and not isinstance(value, str):
        raise Refused(f"{where}{key!r} is {type(value).__name__}, not a string")


def _encodable(value: Any) -> bool:
    """True when every string in ``value`` can be written as UTF-8 (JSON's
    ``\\ud800`` escapes decode to lone surrogates, which cannot)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    return True


def parse(payload: str, codecs: dict[str, Any]) -> dict[str, Any]:
    """The kombu message stored as ``payload``, or :class:`Refused`.

    ``codecs`` are the body encodings the channel knows (kombu's virtual
    channel: ``base64``).
    """
    message = _loads(payload)
    if not isinstance(message, dict) or "body" not in message:
        raise Refused("not a kombu message (no body)")
    try:
        if "\\u" in payload and not _encodable(message):
            raise Refused("a string holds a lone UTF-16 surrogate (not valid Unicode)")
    except RecursionError:
        raise Refused("not JSON: nested too deeply") from None
    props = message.setdefault("properties", {})
    if not isinstance(props, dict):
        raise Refused(f"properties is {type(props).__name__}, not an object")
    info = props.setdefault("delivery_info", {})
    if not isinstance(info, dict):
        raise Refused(f"properties.delivery_info is {type(info).__name__}, not an object")
    headers = message.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise Refused(f"headers is {type(headers).__name__}, not an object")
    for key in ("content-type", "content-encoding"):
        _optional_str(message, key, "")
    for key in ("correlation_id", "reply_to"):
        _optional_str(props, key, "properties.")
    _check_body(message["body"], props.get("body_encoding"), codecs)
    if headers and "task" in headers:
        check_task_headers(headers)
    return message


def _check_body(body: Any, encoding: Any, codecs: dict[str, Any]) -> None:
    if not isinstance(body, str):
        raise Refused(f"body is {type(body).__name__}, not a string")
    if encoding is None:
        return
    codec = codecs.get(encoding) if isinstance(encoding, str) else None
    if codec is None:
        raise Refused(f"unknown body_encoding {encoding!r:.100}")
    if body:
        try:
            codec.decode(body)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the same
            raise Refused(f"body is not valid {encoding}: {exc}") from None


# -- Celery task messages -----------------------------------------------------


def parse_time(value: Any) -> float | None:
    """An ETA/expires header (ISO 8601 text or a UNIX time) as a UNIX time;
    None when absent. Raises :class:`Refused` for anything else."""
    if value is None:
        return None
    try:
        if isinstance(value, Real) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            when = datetime.fromisoformat(value)
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = when.timestamp()
        else:
            raise ValueError(value)
        # Within what a datetime holds in UTC (years 1 to 9999), as every
        # consumer converts it back.
        return datetime.fromtimestamp(seconds, timezone.utc).timestamp()
    except (OverflowError, OSError, ValueError):
        raise Refused(f"{value!r:.100} is not an ISO 8601 time") from None


def due_time(headers: dict[str, Any], threshold: float) -> datetime | None:
    """When a task message published now may first be claimed: its ETA, if
    that lies more than ``threshold`` seconds ahead; None (at once) for
    anything else, a naive or unreadable ETA included (the worker judges it)."""
    value = headers.get("eta")
    if "task" not in headers or not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
        if when.tzinfo is None or when - datetime.now(timezone.utc) <= timedelta(seconds=threshold):
            return None
    except (ValueError, OverflowError):
        return None
    return when


def _name(headers: dict[str, Any], key: str, required: bool = False) -> None:
    value = headers.get(key)
    if value is None:
        if required:
            raise Refused(f"not a Celery task message: no {key!r} header")
        return
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or "\x00" in value:
        raise Refused(f"invalid header {key!r}: {value!r:.100}")


def _limit(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        seconds = float(value)
    except OverflowError:
        return False
    return math.isfinite(seconds) and 0 <= seconds <= MAX_TIME_LIMIT


def check_task_headers(headers: Any) -> None:
    """Raise :class:`Refused` unless ``headers`` are a usable Celery (protocol 2) set."""
    if not isinstance(headers, dict):
        raise Refused("not a Celery task message: no headers")
    _name(headers, "task", required=True)
    _name(headers, "id", required=True)
    for key in ("root_id", "parent_id", "group", "shadow"):
        _name(headers, key)
    for key in ("eta", "expires"):
        try:
            parse_time(headers.get(key))
        except Refused as exc:
            raise Refused(f"invalid header {key!r}: {exc}") from None
    retries = headers.get("retries")
    if retries is not None and (
        not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries < 2**31
    ):
        raise Refused(f"invalid header 'retries': {retries!r:.100}")
    stamped = headers.get("stamped_headers")
    if stamped is not None and (
        not isinstance(stamped, list) or not all(isinstance(h, str) for h in stamped)
    ):
        raise Refused(f"invalid header 'stamped_headers': {stamped!r:.100}")
    for key, kind in (("stamps", dict), ("replaced_task_nesting", int)):
        value = headers.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise Refused(f"invalid header {key!r}: {value!r:.100}")
    limits = headers.get("timelimit")
    if limits is not None and (
        not isinstance(limits, (list, tuple)) or len(limits) != 2 or not all(map(_limit, limits))
    ):
        raise Refused(f"invalid header 'timelimit': {limits!r:.100}")


# -- writing -------------------------------------------------------------------

#: Message properties kombu itself sets; other keyword arguments of
#: ``Producer.publish`` land among the properties too.
_KNOWN_PROPERTIES = frozenset(
    (
        "body_encoding",
        "delivery_info",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
    )
)


def dumps(message: dict[str, Any]) -> str:
    """The stored text of ``message``. An extra property JSON cannot carry
    (``publish(body, **kwargs)`` forwarding anything) is left out, as AMQP
    clients send only the properties they know; the rest must encode."""
    try:
        return json.dumps(message, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        props = message["properties"]
        for key in [k for k in props if k not in _KNOWN_PROPERTIES]:
            try:
                json.dumps(props[key], allow_nan=False)
            except (TypeError, ValueError):
                logger.debug("Property %r cannot be stored as JSON; left out", key)
                del props[key]
        return json.dumps(message, separators=(",", ":"), allow_nan=False)
