"""``python -m tiercache``: one-line errors with argparse exit codes, the demo, and ``gc``."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import tiercache
from tiercache import owners
from tiercache.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["demo", "--host", "abc"], ["--host", "cannot parse size 'abc'"]),
        (["demo", "--host=-1"], ["--host", "must not be negative"]),
        (["demo", "--disk", "12XB"], ["--disk", "cannot parse"]),
        (["demo", "--count", "-3"], ["--count", "at least 1"]),
        (["demo", "--count", "x"], ["--count", "whole number"]),
        (["demo", "--value-size", "3"], ["--value-size", "multiple of 4"]),
        (["demo", "--value-size", "6"], ["--value-size", "multiple of 4"]),
        (["demo", "--value-size", "0"], ["--value-size", "larger than 0"]),
        (["demo", "--disk", "0", "--path", "/tmp/x"], ["--disk 0 disables"]),
        (["demo", "--disk", "0", "--host", "0"], ["no tier"]),
        (["demo", "--value-size", "4MiB", "--host", "1MiB", "--disk", "0"], ["larger than every tier"]),
        (["gc", "/nonexistent/store"], ["does not exist"]),
        (["bogus"], ["invalid choice"]),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, needles, run_cli, assert_one_line_error):
    code, out, err = run_cli(main, *argv)
    assert code == 2
    assert_one_line_error(err, *needles)


def test_path_that_is_a_file_or_foreign_folder(tmp_path, run_cli, assert_one_line_error):
    f = tmp_path / "file"
    f.write_text("mine")
    code, _, err = run_cli(main, "demo", "--path", str(f), "--count", "1")
    assert code == 2 and f.read_text() == "mine"
    assert_one_line_error(err, "not a directory")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    code, _, err = run_cli(main, "demo", "--path", str(folder), "--count", "1")
    assert code == 2 and (folder / "notes.txt").read_text() == "keep"
    assert_one_line_error(err, "not empty and is not a tiercache store")
    code, _, err = run_cli(main, "gc", str(folder))
    assert code == 2
    assert_one_line_error(err, "not a tiercache store")


def test_lock_held_by_another_run_is_a_runtime_error(tmp_path, run_cli, assert_one_line_error):
    path = tmp_path / "s"
    with tiercache.Cache(host=0, disk="4MiB", path=path):
        for argv in (["demo", "--path", str(path), "--count", "1"], ["gc", str(path)]):
            code, _, err = run_cli(main, *argv)
            assert code == 1
            assert_one_line_error(err, "in use by another open tiercache.Cache", "--debug")


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "s"
    with tiercache.Cache(host=0, disk="4MiB", path=path):
        with pytest.raises(tiercache.CacheLockedError):
            main(["--debug", "demo", "--path", str(path), "--count", "1"])
        with pytest.raises(tiercache.CacheLockedError):
            main(["demo", "--debug", "--path", str(path), "--count", "1"])


def test_demo_host_only_and_persisted(tmp_path, run_cli):
    code, out, err = run_cli(main, "demo", "--disk", "0", "--count", "3", "--value-size", "4KiB", "--no-progress")
    assert code == 0, err
    assert "3 bit-exact" in out and "disk=off" in out and "path" not in err
    path = tmp_path / "s"
    code, out, err = run_cli(main, "demo", "--host", "64KiB", "--disk", "1MiB", "--path", str(path), "--count", "40",
                         "--value-size", "16KiB", "--no-progress")
    assert code == 0, err
    assert "40 bit-exact" in out and "reopened" in out and "40 entries persisted" in out
    assert "host->disk" in out and "KiB" in out.split("moved between tiers:")[1]  # human units, not raw ints


def test_demo_does_not_keep_values_in_ram(monkeypatch, run_cli):
    """Verification regenerates each value from its seed, so at most a couple of values are alive at once."""
    import weakref

    import tiercache.__main__ as cli

    refs, most_alive = [], 0
    real = cli._value

    def tracked(i, numel):
        nonlocal most_alive
        most_alive = max(most_alive, sum(r() is not None for r in refs))
        t = real(i, numel)
        refs.append(weakref.ref(t))
        return t

    monkeypatch.setattr(cli, "_value", tracked)
    code, out, _ = run_cli(main, "demo", "--disk", "0", "--count", "50", "--value-size", "4KiB", "--no-progress")
    assert code == 0 and "50 bit-exact" in out
    assert len(refs) == 100  # generated once to put and once more to verify
    assert most_alive <= 2


def test_gc_reclaims_dead_owners_and_prints_human_units(tmp_path, run_cli):
    path = tmp_path / "s"
    with tiercache.Cache(host=0, disk="8MiB", path=path) as cache:
        code = textwrap.dedent(f"""
            from tiercache import owners
            owners.register({str(path)!r}, "dead1")
            import os; os._exit(0)
        """)
        subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
        for i in range(4):
            cache.put(("dead1", i), torch.ones(64 * 1024 // 4))
        cache.put(("other", 0), torch.ones(4))
    code, out, err = run_cli(main, "gc", str(path))
    assert code == 0, err
    assert "reclaimed 4 entries" in out and "KiB" in out and "1 dead owner" in out and "1 entries remain" in out
    with tiercache.Cache(host=0, disk="8MiB", path=path) as cache:
        assert list(cache.keys()) == [("other", 0)]
    assert owners.list_owners(path) == []


def test_ctrl_c_exits_130_without_traceback(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiercache", "demo", "--disk", "0", "--host", "64MiB", "--count", "100000000",
         "--value-size", "4KiB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        # A shell running this suite in the background without job control starts it with SIGINT ignored, and
        # an ignored SIGINT is inherited (Python then installs no KeyboardInterrupt handler): restore the
        # default disposition of an interactive terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.readline().startswith("tiercache demo:")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
