"""The roofline ideal of ``vtoken bench``: weights counted per part as the model holds them, the ideal of a
weight-bound prefill well below the FLOPs ratio, peaks from the datasheet table or the command line."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llava
from transformers import LlavaConfig

from vtoken.cli import main
from vtoken.evals.bench.flops import decoder_layer_weights, prefill_flops, prefill_parts
from vtoken.evals.bench.models import PRESETS
from vtoken.evals.bench.roofline import datasheet_peak, device_peak, ideal_ms


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_weights_per_part_are_the_models_parameters():
    model = tiny_llava()
    parts = {name: weights for name, _, weights in prefill_parts(model.config, [[10]] * 4, 1, 8)}
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    assert parts["vision block 0"] == count(tower.encoder.layers[0])
    assert parts["vision embed"] == count(tower.embeddings) - tower.embeddings.class_embedding.numel()
    assert parts["projector"] == count(model.model.multi_modal_projector)
    lm = model.model.language_model
    assert parts["decoder layer 3"] == count(lm.layers[3]) == decoder_layer_weights(model.config.text_config)
    assert parts["lm head"] == count(model.lm_head) + count(lm.norm)


def llava_7b() -> LlavaConfig:
    spec = dict(PRESETS["llava-1.5-7b"].config)
    spec.pop("kind")
    return LlavaConfig(**spec)


@pytest.mark.parametrize("batch", [1, 16])
def test_ideal_speedup_of_a_weight_bound_prefill_is_below_the_flops_ratio(batch):
    config, peak = llava_7b(), datasheet_peak("NVIDIA H100 80GB HBM3", torch.float16)
    dense = prefill_parts(config, [[641] * batch] * 32, batch, 576 * batch)
    pruned = prefill_parts(config, [[129] * batch] * 32, batch, 64 * batch)
    ideal = ideal_ms(dense, peak, 2) / ideal_ms(pruned, peak, 2)
    flops = (prefill_flops(config, [[641] * batch] * 32, batch, 576 * batch)["total"]
             / prefill_flops(config, [[129] * batch] * 32, batch, 64 * batch)["total"])
    layer = next(p for p in pruned if p[0] == "decoder layer 5")
    if batch == 1:  # 129 tokens x 2 FLOPs per weight is below the H100's ridge of ~295 FLOPs per byte x 2 bytes
        assert ideal_ms([layer], peak, 2) == pytest.approx(1e3 * layer[2] * 2 / 3.35e12)
        assert 1.5 < ideal < 0.6 * flops
    else:  # 16 x 129 tokens: compute-bound everywhere, the ideal is the FLOPs ratio
        assert ideal == pytest.approx(flops, rel=0.02)
    assert ideal_ms(dense, peak, 2) >= 1e3 * sum(p[1] for p in dense) / peak.flops


def test_peaks_come_from_the_datasheet_or_the_command_line():
    assert "H100 SXM" in datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16).source
    assert datasheet_peak("NVIDIA H100 PCIe", torch.float16).bandwidth == 2.0e12
    assert datasheet_peak("NVIDIA H200", torch.float16).bandwidth == 4.8e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", torch.float32).flops == 19.5e12
    assert datasheet_peak("NVIDIA GeForce RTX 4090", torch.float16) is None
    peak, line = device_peak(torch.device("cpu"), torch.float32)
    assert peak is None and "not meaningful on a CPU" in line
    peak, line = device_peak(torch.device("cpu"), torch.float32, 1.5, 50)
    assert peak.flops == 1.5e12 and peak.bandwidth == 50e9 and "assumed" in line
    with pytest.raises(ValueError, match="--peak-tflops and --peak-gbs go together"):
        device_peak(torch.device("cpu"), torch.float32, 1.5, None)


def test_bench_prints_the_ideal_beside_the_measured_speedup(tmp_path, capsys):
    args = ["bench", "--method", "random", "--keep", "64", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
            "--quiet", "--threads", "1"]
    assert main([*args, "--peak-tflops", "1", "--peak-gbs", "50", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "roofline ideal at 1 TFLOP/s and 0.05 TB/s (assumed" in out and "ideal (measured/ideal)" in out
    import json

    random_row = json.loads((tmp_path / "b.json").read_text())["results"][1]
    assert random_row["ideal_speedup"] > 1 and random_row["of_ideal"] == pytest.approx(
        random_row["speedup"] / random_row["ideal_speedup"])
    assert main(args) == 0
    assert "roofline ideal: not meaningful on a CPU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--peak-gbs", "50"])
    assert "--peak-tflops and --peak-gbs go together" in capsys.readouterr().err
