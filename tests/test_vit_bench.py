"""``vtoken bench-vit`` end to end on small models: it runs, and writes the JSON + PNG it promises."""

import json

from tiny_models import tiny_llava

from vtoken.cli import main


def test_bench_vit_timm(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench-vit", "--models", "vit_tiny_patch16_224", "--reps", "1", "--warmup", "0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "RANDOM weights" in printed
    report = json.loads((out / "bench_vit.json").read_text())
    (row,) = report["results"]
    assert (row["grid"], row["clusters"], row["cluster_after"], row["reconstruct_after"]) == ("14x14", "7x7", 3, 12)
    assert row["dense_img_s"] > 0 and row["patched_img_s"] > 0 and 0 < row["mac_ratio"] < 1
    assert -1 <= row["cos_mean"] <= 1 and row["weights"] == "random"
    assert (out / "bench_vit.png").stat().st_size > 0


def test_bench_vit_on_a_saved_llava_checkpoint(tmp_path):
    tiny_llava(vision_layers=4).save_pretrained(tmp_path / "llava")  # an 8x8 patch grid, 4 blocks
    out = tmp_path / "bench"
    assert main(["bench-vit", "--hf", str(tmp_path / "llava"), "--cluster-after", "1", "--num-clusters", "16",
                 "--reps", "1", "--warmup", "0", "--out", str(out)]) == 0
    (row,) = json.loads((out / "bench_vit.json").read_text())["results"]
    # LLaVA reads hidden_states[-2] of a 4-block tower: reconstructed after block 3
    assert (row["cluster_after"], row["reconstruct_after"], row["depth"], row["clusters"]) == (1, 3, 4, "4x4")
    assert "hidden_states[-2]" in row["model"] and row["weights"] == "checkpoint"
