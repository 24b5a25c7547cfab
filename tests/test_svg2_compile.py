"""The SVG2 Triton kernels compile for real GPUs (sm_80, sm_90) within their shared memory, checked without one."""

import pytest
from gpu_compile import SMALLEST_SHARED_MEMORY, compile_for_gpus

pytest.importorskip("triton")

BODY = r'''
from vtoken.kernels.svg2.kmeans import _assign_kernel, _update_kernel
from vtoken.kernels.svg2.sparse_attention import _varblock_attn_kernel

attn = {n: "*i32" for n in ["tile_cluster_ptr", "tile_row_ptr", "q_offsets_ptr", "range_start_ptr", "range_end_ptr",
                            "num_ranges_ptr"]}
attn.update({n: "i32" for n in ["Nq", "Nk", "D", "C", "R", "T"]}, qk_scale_log2="fp32")
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
'''


@pytest.mark.slow
def test_kernels_compile_for_gpus_within_shared_memory():
    shared = compile_for_gpus(BODY)
    assert len(shared) == 5
    assert all(0 <= size <= SMALLEST_SHARED_MEMORY for size in shared.values()), shared
