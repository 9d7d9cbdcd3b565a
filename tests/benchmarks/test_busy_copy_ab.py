"""Smoke test of benchmarks/busy_copy_ab.py: tiny sizes, both thread counts.  No speed is asserted."""

from __future__ import annotations

import torch


def test_runs_every_variant(load_benchmark, capsys):
    bench = load_benchmark("busy_copy_ab")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--threads", "2,1", "--blocks", "3", "--tokens", "16", "--samples", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for count in (1, 2):
        for name in ("caller", "merged", "cat"):
            assert f"threads {count} | {name}: wall us median" in out
    assert "3 blocks of 24 KiB" in out
    from tiercache import batched

    assert batched.BUSY_COPIES_ON_CALLER is True and batched.machine_idle.__name__ == "machine_idle"  # put back
