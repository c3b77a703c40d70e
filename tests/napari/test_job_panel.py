"""The widgets' Run / Cancel / progress panel: progress drawn at a bounded rate."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("napari")

from napari_microrestore._napari._widgets._common import JobPanel  # noqa: E402
from napari_microrestore._napari.scheduler import Scheduler, Task  # noqa: E402
from napari_microrestore.core.errors import check_cancel, report  # noqa: E402

pytestmark = pytest.mark.gui


def _burst_of_reports(*, progress=None, cancel=None) -> str:
    for i in range(1, 41):                       # 40 reports in a few milliseconds
        report(progress, i / 50, f"step {i}")
    report(progress, 0.9, "last stretch")         # then a pause: must still be drawn
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        check_cancel(cancel)
        time.sleep(0.01)
    return "ok"


def test_progress_is_drawn_at_a_bounded_rate_and_the_latest_report_wins(qtbot):
    panel = JobPanel(Scheduler(), "Run")
    qtbot.addWidget(panel)
    drawn: list[int] = []
    panel.progress_bar.valueChanged.connect(drawn.append)
    results: list = []
    job = panel.submit(Task("reports", _burst_of_reports), results.append)
    # the last report arrives while the job pauses: the timer draws it without a new report
    qtbot.waitUntil(lambda: panel.progress_bar.value() == 900, timeout=5000)
    assert not job.done and panel.status.text() == "last stretch"
    qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert results == ["ok"] and panel.progress_bar.value() == 1000
    assert panel.status.text().startswith("done in")
    # 41 reports in ~1 s; at most one drawn per PROGRESS_INTERVAL (plus the end)
    assert len(drawn) <= 1.2 / JobPanel.PROGRESS_INTERVAL + 2, drawn
    assert drawn == sorted(drawn)


def _reports_then_ignores_cancel(*, progress=None, cancel=None) -> str:
    for i in range(1, 11):
        report(progress, i / 10, f"step {i}")
    time.sleep(1.0)                                # deaf to cancel for a while
    check_cancel(cancel)
    return "ok"


def test_a_report_pending_at_cancel_is_not_drawn(qtbot):
    panel = JobPanel(Scheduler(), "Run")
    qtbot.addWidget(panel)
    job = panel.submit(Task("reports", _reports_then_ignores_cancel), lambda _: None)
    # the reports arrive within the first interval after submit: held back, not drawn
    qtbot.waitUntil(lambda: panel._pending is not None, timeout=5000)
    assert panel.progress_bar.value() == 0
    drawn: list[int] = []
    panel.progress_bar.valueChanged.connect(drawn.append)
    panel.cancel()
    qtbot.wait(int(2000 * JobPanel.PROGRESS_INTERVAL))   # the timer's time has passed
    assert not job.done and panel.status.text() == "cancelling..." and drawn == []
    qtbot.waitUntil(lambda: job.done, timeout=5000)
    assert job.state == "cancelled" and drawn == []
    assert panel.progress_bar.value() == 0 and panel.status.text() == "cancelled"
