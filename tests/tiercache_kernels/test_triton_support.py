"""Triton stays optional: importable without it, torch by default on CPU, clear errors otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'kernels'}", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environ, timeout=120)


def test_importing_the_kernels_does_not_import_triton():
    res = _run("""
        import sys
        import tiercache_kernels, tiercache_llm.sparse
        assert callable(tiercache_kernels.block_attention_triton)
        assert "triton" not in sys.modules, "triton was imported eagerly"
    """)
    assert res.returncode == 0, res.stderr


def test_without_triton_the_torch_path_works_and_triton_is_refused_clearly():
    res = _run("""
        import sys
        sys.modules["triton"] = None  # as if not installed
        import torch
        from tiercache_kernels import triton_available
        from tiercache_llm.sparse import KeyDigests, SelectionConfig, select, score_blocks
        assert not triton_available()
        d = KeyDigests.from_keys(torch.randn(1, 2, 16, 8), 4)
        q = torch.randn(1, 4, 1, 8)
        select(q, d, SelectionConfig(budget=8))  # auto -> torch
        try:
            score_blocks(q, d.lo, d.hi, d.count, backend="triton")
        except RuntimeError as exc:
            assert "need triton" in str(exc), exc
        else:
            raise AssertionError("no error")
    """)
    assert res.returncode == 0, res.stderr


def test_cpu_tensors_without_the_interpreter_are_refused_clearly():
    res = _run("""
        import importlib.util, torch
        if importlib.util.find_spec("triton") is None:
            raise SystemExit(0)
        from tiercache_llm.sparse import block_digests, score_blocks
        lo, hi, count = block_digests(torch.randn(1, 1, 8, 4), 4)
        q = torch.randn(1, 1, 1, 4)
        assert torch.equal(score_blocks(q, lo, hi, count), score_blocks(q, lo, hi, count, backend="torch"))
        try:
            score_blocks(q, lo, hi, count, backend="triton")
        except RuntimeError as exc:
            assert "TRITON_INTERPRET=1" in str(exc), exc
        else:
            raise AssertionError("no error")
    """, TRITON_INTERPRET="0")
    assert res.returncode == 0, res.stderr


def test_auto_backend_stays_on_torch_for_cpu_tensors():
    from tiercache_kernels.triton_support import compiled_triton_usable

    assert not compiled_triton_usable(torch.device("cpu"))
