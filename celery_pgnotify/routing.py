"""Pure routing logic shared by the transport and the tests."""

from __future__ import annotations

import re


def topic_pattern(binding_key: str) -> str:
    """A regular expression for an AMQP topic binding key.

    The expression is matched against ``'.' || routing_key`` (a leading dot
    lets every word carry its separator). Words are separated by ``.``;
    ``*`` stands for exactly one word and ``#`` for zero or more words; every
    other character is literal. The syntax is common to Python's ``re`` and
    PostgreSQL's advanced regular expressions.
    """
    parts = []
    for word in binding_key.split("."):
        if word == "*":
            parts.append(r"\.[^.]*")
        elif word == "#":
            parts.append(r"(?:\.[^.]*)*")
        else:
            parts.append(r"\." + _literal(word))
    return "^" + "".join(parts) + "$"


def _literal(word: str) -> str:
    # Escape every character that is special in a regular expression.
    return re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\1", word)
