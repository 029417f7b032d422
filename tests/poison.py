"""Hostile message rows: a valid Celery envelope and ways to break it.

Used by the property test of the claim path (``test_poison.py``) and by the
end-to-end run that feeds the same rows to real workers.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import uuid
from typing import Any

from hypothesis import strategies as st

BODY = json.dumps([[1, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])


def envelope(task: str = "tests.e2e_app.record", args: Any = None) -> dict[str, Any]:
    """A valid Celery (protocol 2, JSON) message as kombu stores it."""
    task_id = str(uuid.uuid4())
    body = BODY if args is None else json.dumps([args, {}, {}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "(1, 2)",
            "kwargsrepr": "{}",
            "origin": "gen1@test",
            "ignore_result": False,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


#: Rows that took down a worker before the claim path checked them: kept as
#: regression examples of the property test and fed to real workers.
def regression_rows() -> list[str]:
    rows = []

    def broken(path: tuple[str, ...], value: Any) -> None:
        message = envelope()
        target = message
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        rows.append(json.dumps(message))

    broken(("properties", "body_encoding"), "rot13")
    broken(("properties", "body_encoding"), ["base64"])
    broken(("body",), "not base64 at all!")
    broken(("body",), 12345)
    broken(("headers",), ["task", "id"])
    broken(("headers",), "headers")
    broken(("properties",), 7)
    broken(("properties", "delivery_info"), "celery")
    broken(("headers", "timelimit"), [None, 1e300])
    broken(("headers", "retries"), 10**30)
    broken(("headers", "task"), {"name": "x"})
    broken(("headers", "id"), None)
    broken(("headers", "eta"), "9999-12-31T23:59:59-01:00")
    broken(("headers", "expires"), "yesterday")
    broken(("content-type",), 5)
    broken(("headers", "stamped_headers"), True)
    text = json.dumps(envelope())
    # Numbers no float holds, and JSON's non-numbers.
    rows.append(text.replace('"timelimit": [null, null]', '"timelimit": [1e400, null]'))
    rows.append(text.replace('"eta": null', '"eta": 1e400'))
    rows.append(text.replace('"expires": null', '"expires": ' + "9" * 5000))
    rows.append(text.replace('"timelimit": [null, null]', '"timelimit": [NaN, null]'))
    rows.append(text.replace('"retries": 0', '"retries": Infinity'))
    # Deeper than the JSON parser's recursion limit, and a lone surrogate.
    rows.append(text.replace('"argsrepr": "(1, 2)"', '"argsrepr": ' + "[" * 5000 + "]" * 5000))
    rows.append(text.replace('"origin": "gen1@test"', '"origin": "\\ud800"'))
    rows.append("[" * 100_000)
    rows.append("not json")
    rows.append('"just a string"')
    rows.append("{}")
    return rows


# -- the generator -----------------------------------------------------------

_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=10**20, max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _numbers,
    st.text(max_size=30),
    st.text(max_size=5).map(lambda t: t * 20_000),  # huge strings
    st.sampled_from(["base64", "rot13", "", "binary", "utf-8", "application/x-python-serialize"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

#: Where a mutation lands: top-level keys, properties and headers.
_PATHS = [
    ("body",),
    ("content-type",),
    ("content-encoding",),
    ("headers",),
    ("properties",),
    ("properties", "body_encoding"),
    ("properties", "delivery_info"),
    ("properties", "priority"),
    ("properties", "correlation_id"),
    ("properties", "reply_to"),
    ("properties", "delivery_info", "routing_key"),
    ("headers", "task"),
    ("headers", "id"),
    ("headers", "eta"),
    ("headers", "expires"),
    ("headers", "retries"),
    ("headers", "timelimit"),
    ("headers", "root_id"),
    ("headers", "parent_id"),
    ("headers", "group"),
    ("headers", "argsrepr"),
    ("headers", "stamped_headers"),
    ("headers", "stamps"),
    ("headers", "replaced_task_nesting"),
    ("headers", "ignore_result"),
]


@st.composite
def _mutated(draw: Any) -> str:
    message = envelope()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(_PATHS))
        target: Any = message
        for key in path[:-1]:
            if not isinstance(target, dict) or not isinstance(target.get(key), dict):
                target = None
                break
            target = target[key]
        if target is None:
            continue
        if draw(st.booleans()) and path[-1] in target:
            del target[path[-1]]
        else:
            target[path[-1]] = draw(_values)
    if draw(st.booleans()):
        message[draw(st.text(max_size=8))] = copy.deepcopy(draw(_values))
    return json.dumps(message)


@st.composite
def _textual(draw: Any) -> str:
    """Breakage only text shows: invalid JSON, cut-off messages, nesting."""
    text = json.dumps(envelope())
    kind = draw(st.sampled_from(["cut", "nest", "replace", "noise"]))
    if kind == "cut":
        return text[: draw(st.integers(min_value=0, max_value=len(text) - 1))]
    if kind == "nest":
        depth = draw(st.integers(min_value=500, max_value=3000))
        return text.replace('"(1, 2)"', "[" * depth + "]" * depth)
    if kind == "replace":
        token = draw(st.sampled_from(["null", "0", '"celery"', '"base64"', "false"]))
        new = draw(st.sampled_from(["NaN", "-Infinity", "1e999", "9" * 4400, '"\\udfff"', "{}"]))
        return text.replace(token, new, 1)
    return draw(st.text(max_size=200))


def rows() -> st.SearchStrategy[str]:
    """Stored message texts, valid or not."""
    return st.one_of(_mutated(), _textual(), st.just(json.dumps(envelope())))


#: Values a random mutation puts in place (for runs outside hypothesis).
_BAD_VALUES: list[Any] = [
    None,
    True,
    -1,
    10**40,
    1e308,
    "",
    "rot13",
    "x" * 100_000,
    "\u00e9\u4e2d",
    [],
    [None, None, None],
    {},
    {"a": [1, {"b": None}]},
    "2024-13-45T99:99:99",
    "9999-12-31T23:59:59-12:00",
]


def sample(count: int, seed: int) -> list[str]:
    """``count`` envelopes broken at random (reproducible from ``seed``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        message = envelope()
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(_PATHS)
            target: Any = message
            for key in path[:-1]:
                target = target.get(key) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                continue
            if rng.random() < 0.3:
                target.pop(path[-1], None)
            else:
                target[path[-1]] = copy.deepcopy(rng.choice(_BAD_VALUES))
        out.append(json.dumps(message))
    return out
