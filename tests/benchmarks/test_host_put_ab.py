"""Smoke test of benchmarks/host_put_ab.py: the repository against itself, tiny sizes, through ``main``.
No speed is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_op_of_every_tree_and_the_dict_is_reported(load_benchmark, capsys):
    bench = load_benchmark("host_put_ab")
    assert bench.main(["--tree", f"a={ROOT}", "--tree", f"b={ROOT}", "--sizes", "4096", "--bytes", "65536",
                       "--threads", "1", "--repeats", "2"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("4096 | ")]
    assert {(row[2], row[3]) for row in rows} == {(op, name) for op in ("put", "get", "put_many", "get_many")
                                                  for name in ("a", "b", "base")}
    assert all(float(row[4].split()[0]) >= 0 and float(row[5]) > 0 for row in rows)


def test_trees_share_the_first_trees_arena_pool_unless_told_otherwise(load_benchmark):
    bench = load_benchmark("host_put_ab")
    options = ["--tree", f"a={ROOT}", "--tree", f"b={ROOT}", "--sizes", "4096", "--bytes", "4096",
               "--threads", "1", "--repeats", "1", "--no-base"]

    def pools() -> tuple[object, object]:
        return sys.modules["tc_ab_a.tiers.memory"].ARENA_POOL, sys.modules["tc_ab_b.tiers.memory"].ARENA_POOL
    bench.main(options + ["--own-arenas"])
    first, second = pools()
    assert first is not second
    bench.main(options)
    first, second = pools()
    assert first is second


def test_a_bad_tree_option_is_refused(load_benchmark):
    bench = load_benchmark("host_put_ab")
    with pytest.raises(SystemExit):
        bench.main(["--tree", "base=."])
