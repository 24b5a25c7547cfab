"""The SVG2 Triton kernels compile for real GPUs (sm_80, sm_90) within their shared memory, checked without one: the
default tiles on the smallest of them, the tuner's largest attention tile on an H100."""

import pytest
from gpu_compile import SMALLEST_SHARED_MEMORY, compile_for_gpus

pytest.importorskip("triton")

BODY = r'''
from vtoken.kernels.svg2.kmeans import _assign_kernel, _means_kernel
from vtoken.kernels.svg2.sparse_attention import _varblock_attn_kernel

attn = {n: "*i32" for n in ["tile_cluster_ptr", "tile_row_ptr", "q_offsets_ptr", "range_start_ptr", "range_end_ptr",
                            "num_ranges_ptr"]}
attn.update({n: "i32" for n in ["Nq", "Nk", "D", "C", "R", "T"]}, qk_scale_log2="fp32")
for dtype, upcast, block, arch in [("*bf16", False, 64, 90), ("*fp16", False, 64, 80), ("*fp32", True, 32, 80)]:
    types = {**attn, **{n: dtype for n in ["q_ptr", "k_ptr", "v_ptr", "o_ptr"]}}
    consts = {"UPCAST": upcast, "BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": 128}
    shared[f"attention {dtype} sm_{arch}"] = compile_kernel(_varblock_attn_kernel, types, consts, arch).metadata.shared
dims = {"N": "i32", "K": "i32", "D": "i32"}
for accumulate in (False, True):
    shared[f"assign *bf16 sm_90, accumulate={accumulate}"] = compile_kernel(
        _assign_kernel, {"x_ptr": "*bf16", "c_ptr": "*fp32", "labels_ptr": "*i64", "acc_ptr": "*fp32", **dims},
        {"ACCUMULATE": accumulate, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 128}, 90).metadata.shared
shared["means sm_80"] = compile_kernel(
    _means_kernel, {"acc_ptr": "*fp32", "old_ptr": "*fp32", "out_ptr": "*fp32", "sizes_ptr": "*i64", "K": "i32",
                    "D": "i32"}, {"BLOCK_K": 64, "BLOCK_D": 128}, 80).metadata.shared
types = {**attn, **{n: "*bf16" for n in ["q_ptr", "k_ptr", "v_ptr", "o_ptr"]}}
consts = {"UPCAST": False, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 128}
largest["attention *bf16 128 x 128 sm_90"] = compile_kernel(_varblock_attn_kernel, types, consts, 90).metadata.shared
'''


@pytest.mark.slow
def test_kernels_compile_for_gpus_within_shared_memory():
    shared = compile_for_gpus("largest = shared['largest'] = {}\n" + BODY)
    largest = shared.pop("largest")
    assert len(shared) == 6
    assert all(0 <= size <= SMALLEST_SHARED_MEMORY for size in shared.values()), shared
    # the tuner's largest tile fits an H100 (228 KiB per block); where it does not fit, the tuner skips it
    assert all(0 <= size <= 227 * 1024 for size in largest.values()), largest
