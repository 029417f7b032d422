"""The fault checker (``tests/checker.py``), short schedule: every fault once
over a mixed fleet. ``bench/faults.py`` runs the long version."""

from __future__ import annotations

from typing import Any

import pytest

from tests.checker import HEADER, Fleet, History, run, schedule

pytestmark = [pytest.mark.e2e, pytest.mark.checker]


@pytest.mark.timeout(900)
def test_every_fault_on_a_mixed_fleet(own_server: Any, tmp_path: Any, figures: list[str]) -> None:
    fleet = Fleet(own_server, str(tmp_path))
    try:
        if fleet.no_partition is not None:
            figures.append(f"checker: network partitions skipped: {fleet.no_partition}")
        outcomes = run(fleet, schedule(fleet))
        figures += ["checker (short schedule):", HEADER, *(o.row() for o in outcomes)]
        figures.append(f"checker: executions per worker: {History.read(fleet).per_member()}")
        problems = [line for o in outcomes for line in o.problems()]
        assert not problems, "\n".join(problems) + "\n" + fleet.output()
    finally:
        fleet.close()
