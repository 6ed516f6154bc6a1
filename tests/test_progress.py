"""Progress that never goes silent: when no bar is on a terminal, a log line at least every interval."""

from __future__ import annotations

import logging

from harness.progress import Progress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_logs_every_interval_with_eta_when_not_a_terminal(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="harness.progress"):
        bar = Progress(total=100, desc="unet", every=30.0, clock=clock)
        for _ in range(100):
            clock.t += 1.0  # one step a second
            bar.update(1)
            if bar.n == 50:
                bar.set_postfix(loss="0.123")
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # at 30, 60 and 90 s, then the closing line
    assert lines[0] == "unet: 30/100 it (30%), 0:30 elapsed, ETA 1:10"
    assert lines[2].startswith("unet: 90/100 it (90%), 1:30 elapsed, ETA 0:10 [loss=0.123]")
    assert lines[3].endswith("(done)") and "100/100" in lines[3]


def test_silent_when_disabled_and_short_phases_stay_quiet(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="harness.progress"):
        bar = Progress(total=10, desc="quiet", disable=True, every=1.0, clock=clock)
        for _ in range(10):
            clock.t += 5
            bar.update()
        bar.close()
        short = Progress(range(3), desc="short", every=30.0, clock=clock)
        assert list(short) == [0, 1, 2]
    assert caplog.records == []


def test_unknown_total_and_iteration():
    clock = FakeClock()
    bar = Progress(desc="scan", every=0.0, clock=clock)
    bar.update(7)
    assert bar.line() == "scan: 7/? it, 0:00 elapsed"
