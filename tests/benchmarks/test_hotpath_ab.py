"""Smoke test of benchmarks/hotpath_ab.py's rows 3-4 as hotpath.py times them (``--like-hotpath``): the
repository against itself, tiny sizes.  No speed is asserted."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_like_hotpath_rows_time_every_op_of_both_trees_and_the_dict(load_benchmark):
    bench = load_benchmark("hotpath_ab")
    trees = {"old": bench.load_tree("tc_old", ROOT), "new": bench.load_tree("tc_new", ROOT)}
    run = bench.row34_hotpath(trees, 4096, 50)
    for name in ("old", "new", "base"):
        result = run(name)
        assert set(result) == {"put", "get", "put_many", "get_many"}
        assert all(wall > 0 and cpu >= 0 for wall, cpu in result.values())
