"""The SVG2 Triton kernels compile for real GPUs (sm_80, sm_90), checked without one.

The CPU tests run the kernels in Triton's interpreter, which accepts things the GPU compiler rejects (small dot
shapes, for one). Here each kernel goes through Triton's NVIDIA backend (down to a cubin, with the bundled ptxas) in a
subprocess without TRITON_INTERPRET, and the shared memory it needs is checked against the smallest of those GPUs.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vtoken.kernels.svg2.kmeans import _assign_kernel, _update_kernel
from vtoken.kernels.svg2.sparse_attention import _varblock_attn_kernel

def compile_kernel(fn, types, consts, arch):
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32))

attn = {n: "*i32" for n in ["tile_cluster_ptr", "tile_row_ptr", "q_offsets_ptr", "range_start_ptr", "range_end_ptr",
                            "num_ranges_ptr"]}
attn.update({n: "i32" for n in ["Nq", "Nk", "D", "C", "R", "T"]}, qk_scale_log2="fp32")
shared = {}
for dtype, upcast, block, arch in [("*bf16", False, 64, 90), ("*fp16", False, 64, 80), ("*fp32", True, 32, 80)]:
    types = {**attn, **{n: dtype for n in ["q_ptr", "k_ptr", "v_ptr", "o_ptr"]}}
    consts = {"UPCAST": upcast, "BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": 128}
    shared[f"attention {dtype} sm_{arch}"] = compile_kernel(_varblock_attn_kernel, types, consts, arch).metadata.shared
dims = {"N": "i32", "K": "i32", "D": "i32"}
shared["assign *bf16 sm_90"] = compile_kernel(
    _assign_kernel, {"x_ptr": "*bf16", "c_ptr": "*fp32", "labels_ptr": "*i64", **dims},
    {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 128}, 90).metadata.shared
shared["update *bf16 sm_90"] = compile_kernel(
    _update_kernel, {"x_ptr": "*bf16", "order_ptr": "*i64", "offsets_ptr": "*i64", "old_ptr": "*fp32",
                     "out_ptr": "*fp32", **dims}, {"BLOCK_N": 64, "BLOCK_D": 128}, 90).metadata.shared
print(json.dumps(shared))
'''


@pytest.mark.slow
def test_kernels_compile_for_gpus_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 5
    assert all(0 <= size <= 99 * 1024 for size in shared.values()), shared  # fits sm_86/89 (99 KiB) and up
