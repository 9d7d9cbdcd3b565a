"""The Triton kernels compile for an H100 (sm_90) down to a cubin, without a GPU: catches compile-time
errors (types, tl.dot shapes, loop-carried values) on CPU-only machines.  Runtime correctness on a GPU is
the ``gpu``-marked tests' job."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from tiercache_kernels._block_attention_triton import block_attention_kernel
    from tiercache_kernels._block_scores_triton import block_scores_kernel
    from tiercache_kernels._page_attention_triton import page_attention_kernel

    def build(body, types, consts):
        fn = JITFunction(body)
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), "no cubin"

    for dt in ("fp32", "bf16"):
        types = {"q_ptr": "*" + dt, "k_ptr": "*" + dt, "v_ptr": "*" + dt, "valid_ptr": "*u8", "table_ptr": "*i32",
                 "len_ptr": "*i32", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "lse_ptr": "*fp32",
                 "scale": "fp32"}
        build(block_attention_kernel.fn, types, {"BLOCK_G": 16, "BLOCK_S": 64, "BLOCK_D": 64})
    for dt, page in (("fp32", 8), ("bf16", 1)):
        types = {"q_ptr": "*" + dt, "k_ptr": "*" + dt, "v_ptr": "*" + dt, "slot_ptr": "*i64", "page_ptr": "*i64",
                 "valid_ptr": "*u8", "cnt_ptr": "*i64", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                 "lse_ptr": "*fp32", "scale": "fp32"}
        build(page_attention_kernel.fn, types, {"BLOCK_G": 16, "BLOCK_E": max(1, 64 // page), "BLOCK_P": page,
                                                "BLOCK_D": 64})
    types = {"q_ptr": "*fp16", "lo_ptr": "*fp16", "hi_ptr": "*fp16", "cnt_ptr": "*i64", "out_ptr": "*fp32"}
    build(block_scores_kernel.fn, types, {"IS_MAX": True, "BLOCK_N": 64, "BLOCK_D": 64})
    print("compiled")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'kernels'}", TRITON_INTERPRET="0",
               TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
