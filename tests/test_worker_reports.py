"""Worker reports: read back while fresh, gone one freshness period after the last one."""

from __future__ import annotations

import pytest

from kvstore.worker_reports import WorkerReports

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_reports_are_read_back_while_fresh_and_dropped_after() -> None:
    clock = FakeClock()
    reports = WorkerReports(fresh_s=3.0, clock=clock)
    await reports.report("a", {"num_requests_running": 3, "kv_cache_usage": 0.5})
    clock.now += 2
    await reports.report("b", {"num_requests_running": 1})
    assert await reports.worker_stats() == {
        "a": {"num_requests_running": 3, "kv_cache_usage": 0.5},
        "b": {"num_requests_running": 1},
    }
    clock.now += 1.5  # a has been silent for 3.5 s > 3 s: a dead worker leaves /metrics
    assert await reports.worker_stats() == {"b": {"num_requests_running": 1}}
    await reports.report("a", {"num_requests_running": 0})  # a restarted worker comes back
    assert set(await reports.worker_stats()) == {"a", "b"}
    await reports.remove_worker("b")
    await reports.remove_worker("never-seen")
    assert set(await reports.worker_stats()) == {"a"}


async def test_a_report_is_a_copy_and_freshness_must_be_positive() -> None:
    reports = WorkerReports()
    stats = {"num_requests_running": 1}
    await reports.report("a", stats)
    stats["num_requests_running"] = 9
    assert (await reports.worker_stats())["a"] == {"num_requests_running": 1}
    with pytest.raises(ValueError, match="fresh_s"):
        WorkerReports(fresh_s=0)
