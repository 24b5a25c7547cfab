"""The roofline ideal of a prefill: what it would take if every part ran at the device's peak.

Each part of a prefill (every vision-tower block, the patch embedding, the projector, every decoder layer, the LM
head) has to do its FLOPs and read its weights at least once, so it takes at least
``max(FLOPs / peak FLOP/s, weight bytes / peak memory bandwidth)``; the ideal prefill time is the sum over parts.
At batch 1, a pruned 7B prefill of ~130 tokens is bound by reading the weights, so its ideal speed-up over dense is
well below the FLOPs ratio. Activations, the KV-cache writes and kernel launches are left out, so measured times
sit above the ideal. FLOPs come from :mod:`vtoken.evals.bench.flops`.

Peaks are datasheet figures (dense, no sparsity) looked up by GPU name; other devices take ``--peak-tflops`` and
``--peak-gbs``. On a CPU there is no table: the ideal is not computed unless both are given, and then labelled as
assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s for the run's dtype
    bandwidth: float  # bytes/s of device memory
    source: str  # where the figures come from, printed beside every ideal

    def line(self) -> str:
        return (f"roofline ideal at {self.flops / 1e12:.0f} TFLOP/s and {self.bandwidth / 1e12:.2f} TB/s "
                f"({self.source})")


# name fragment (matched in order against torch.cuda.get_device_name) -> (label, 16-bit tensor-core FLOP/s,
# fp32 FLOP/s without TF32, memory bytes/s), from the vendor's datasheets
DATASHEET = (
    ("H200", "H200 SXM", 989e12, 67e12, 4.8e12),
    ("H100 NVL", "H100 NVL", 835e12, 60e12, 3.9e12),
    ("H100 PCIe", "H100 PCIe", 756e12, 51e12, 2.0e12),
    ("H100", "H100 SXM", 989e12, 67e12, 3.35e12),
    ("A100-SXM4-40GB", "A100 SXM 40GB", 312e12, 19.5e12, 1.555e12),
    ("A100-PCIE-40GB", "A100 PCIe 40GB", 312e12, 19.5e12, 1.555e12),
    ("A100 80GB PCIe", "A100 PCIe 80GB", 312e12, 19.5e12, 1.935e12),
    ("A100", "A100 SXM 80GB", 312e12, 19.5e12, 2.039e12),
)


def datasheet_peak(gpu_name: str, dtype: torch.dtype) -> Peak | None:
    for fragment, label, half, single, bandwidth in DATASHEET:
        if fragment in gpu_name:
            flops = single if dtype == torch.float32 else half
            return Peak(flops, bandwidth, f"datasheet peak of the {label}, {str(dtype).removeprefix('torch.')}")
    return None


def device_peak(device: torch.device, dtype: torch.dtype, tflops: float | None = None,
                gbs: float | None = None) -> tuple[Peak | None, str]:
    """The peak to measure against and a line that says where it comes from (or why there is none)."""
    if (tflops is None) != (gbs is None):
        raise ValueError("--peak-tflops and --peak-gbs go together: give both, or neither to use the GPU's datasheet")
    if tflops is not None:
        where = "assumed" if device.type != "cuda" else "given"
        peak = Peak(tflops * 1e12, gbs * 1e9, f"{where} with --peak-tflops/--peak-gbs")
        return peak, peak.line()
    if device.type != "cuda":
        return None, ("roofline ideal: not meaningful on a CPU (no peak figures); pass --peak-tflops and --peak-gbs "
                      "to compare against assumed ones")
    name = torch.cuda.get_device_name(device)
    peak = datasheet_peak(name, dtype)
    if peak is None:
        return None, f"roofline ideal: no datasheet figures for {name}; pass --peak-tflops and --peak-gbs"
    return peak, peak.line()


def ideal_ms(parts: list[tuple[str, float, float]], peak: Peak, bytes_per_weight: int) -> float:
    """Sum over (name, FLOPs, weights) parts of the larger of compute time and weight-read time, in ms."""
    return 1e3 * sum(max(flops / peak.flops, weights * bytes_per_weight / peak.bandwidth)
                     for _, flops, weights in parts)
