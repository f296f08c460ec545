"""The soak harness (bench/soak.py) for ten seconds: every scenario it runs must succeed or fail as expected.

Memory growth is the harness's own verdict on a real ten-minute run (docs/soak.md); a test on a
shared CI machine only checks that the load it generates is right and that the server survives it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")


def test_a_short_soak_has_no_unexpected_errors(tmp_path: Path) -> None:
    report = run_soak(10, 2, interval=1, lease=1, results_dir=tmp_path, echo=lambda _: None)

    assert report["unexpected"] == [] and report["unexpected_errors"] == 0
    assert report["server_exit_status"] == 0
    # The load reached the server: sessions, expected failures and the everyday calls all ran.
    assert report["calls"]["avgparms"] > 0 and report["calls"]["free"] > 0
    assert report["expected_errors_total"] > 0
    assert all(key.split()[0] in {"NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION"}
               for key in report["expected_errors"])
    written = json.loads(Path(report["report_path"]).read_text())
    assert written["calls"] == report["calls"]
    # The server forgets request IDs before the baseline, so the exactly-once table is not read as growth.
    assert written["server_args"][:2] == ["--request-id-window-seconds", "30.0"]
    assert len(written["samples"]) >= 2 and all(rss_kb > 0 for _, rss_kb, _ in written["samples"])
