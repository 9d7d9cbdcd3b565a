"""benchmarks/selection_micro.py at tiny sizes: both modes run and report (no speed asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "selection_micro.py"), "--batch", "2", "--context", "300",
                          "--layers", "2", "--steps", "2", "--warmup", "0", *args],
                         check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    return out.stdout


def test_page_ab_reports_both_page_sizes():
    out = _run("--page-ab", "4")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["8", "4"]
    assert int(rows[1][1]) >= 2 * int(rows[0][1]) - 1  # ceil(t / 4) pages against ceil(t / 8)
    assert "load average" in out


def test_revision_ab_against_head_is_bit_identical():
    out = _run("--baseline-rev", "HEAD")
    assert "scores not bit-identical: 0" in out
