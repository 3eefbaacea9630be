"""The fault-injection suite's short form, in CI: the real system (Kafka, PostgreSQL, a manager,
>= 2 worker processes) under each fault, and the checker's verdict: nothing acknowledged is lost.

Scenarios that restart the shared broker or database run last (file order) and wait for the
services to be back before returning.
"""

from __future__ import annotations

import pytest

from scripts.faults.scenarios import SCENARIOS, Ctx

pytestmark = pytest.mark.restarts  # restarts the shared broker/database: `make test` only, not test-fast

ORDER = ["adapters", "poison", "kill-consume", "kill-commit", "flood", "handover", "manager-failover",
         "postgres-outage", "kafka-restart"]


@pytest.mark.parametrize("name", ORDER)
def test_fault_scenario_loses_nothing(name, database_url, kafka_bootstrap, tmp_path):
    row = SCENARIOS[name](Ctx(database_url, kafka_bootstrap, short=True, out=tmp_path))
    row.pop("_history", None)
    print(name, {k: v for k, v in row.items() if k != "outcomes"})
    assert row["lost"] == 0, row
    assert row["acked"] > 0 and row["replied"] + row["dlq"] > 0, row
    if name == "adapters":
        assert row["replied"] == row["sent"] == 11, row["outcomes"]
    if name == "flood":
        assert row["bounded"], row["notes"]
        assert row["statuses"].get("expired", 0) > 0, "a flood with 2 s deadlines should expire some requests"
    if name == "poison":
        assert row["dlq"] >= 1000 * 4 // 7, row  # random, truncated, bad tenant type and wrong types
    if name.startswith("kill"):
        assert "crashed by SIGKILL: True" in row["notes"], row["notes"]
    if name == "manager-failover":
        assert "standby took over" in row["notes"], row["notes"]
