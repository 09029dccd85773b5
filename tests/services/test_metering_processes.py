"""Meter events across a crash: a recording process killed with SIGKILL at random moments keeps every event it
acknowledged, exactly once, with period totals that still equal the sum of the events.

Small by default; the issue's size runs with `-m slow` (or set METERING_KILLS)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from aims_billing_mcp.store import Store
from tests.support.processes import kill_midway

WORKER = Path(__file__).parents[1] / "support" / "metering_worker.py"


@pytest.mark.parametrize("kills", [
    pytest.param(int(os.environ.get("METERING_KILLS", "3")), id="quick"),
    pytest.param(20, id="issue-size", marks=pytest.mark.slow),
])
def test_a_recorder_killed_with_sigkill_keeps_every_acknowledged_event_exactly_once(
        tmp_path: Path, kills: int) -> None:
    path = tmp_path / "crash.db"
    rng = random.Random(int(os.environ.get("METERING_SEED", "20260301")))
    acknowledged: set[str] = set()
    for run in range(kills):
        before, rest = kill_midway([sys.executable, str(WORKER), str(path), str(run)], rng.randint(1, 3000),
                                   label=f"run {run}")
        acknowledged.update(line.strip() for line in before)
        acknowledged.update(line.strip() for line in rest if line.strip())

        store = Store(path)
        try:
            stored = [row["identifier"] for row in store.query("SELECT identifier FROM meter_events")]
            assert acknowledged <= set(stored), f"after kill {run + 1}: lost {len(acknowledged - set(stored))}"
            assert len(stored) == len(set(stored))
            totals = store.query(  # each period's totals row plus its events not folded yet (migration 0022)
                "SELECT customer_id, period_start, SUM(weighted_units) AS weighted_units, SUM(raw_units) AS "
                "raw_units, SUM(events) AS events FROM (SELECT customer_id, period_start, weighted_units, raw_units, "
                "events FROM meter_usage_totals UNION ALL SELECT customer_id, period_start, weighted_units, raw_units, "
                "1 FROM meter_events WHERE id > (SELECT folded_upto FROM meter_usage_version)) GROUP BY 1, 2 "
                "ORDER BY 1, 2")
            sums = store.query("SELECT customer_id, period_start, SUM(weighted_units) AS weighted_units, "
                               "SUM(raw_units) AS raw_units, COUNT(*) AS events FROM meter_events "
                               "GROUP BY 1, 2 ORDER BY 1, 2")
            assert totals == sums, f"after kill {run + 1}"
        finally:
            store.close()
