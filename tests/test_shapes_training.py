"""ShapesVQA training: losses and metrics, the trainer's runs (smoke, time limit, autocast, hard task, tower
learning rate, continuations) and what its reports record."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from vtoken.evals.shapes import data as sd
from vtoken.evals.shapes import evaluate as sv
from vtoken.evals.shapes import model as sm
from vtoken.evals.shapes import training as ts
from vtoken.evals.shapes.data import make_split


def test_patch_accuracy_scores_the_labelled_patches_of_shapes_only():
    """Head 0 (colour) is right everywhere, head 1 right on every labelled patch; patch 1 is background and patch 2
    a shape patch that head 1 has no label for (IGNORE): neither may count, for or against."""
    heads = ts.PatchHeads(4, (2, 2))
    with torch.no_grad():
        for head, (i, j) in zip(heads.heads, [(0, 1), (2, 3)]):
            head.weight.zero_(), head.bias.zero_()
            head.weight[0, i] = head.weight[1, j] = 1.0
    feats = torch.tensor([[[0.0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0]]])  # (1, 4 patches, 4)
    targets = torch.tensor([[[1, 0, 1, 1], [1, 0, sd.IGNORE, 1]]])  # (1, 2 targets, 4 patches)
    _, counts = heads(feats, targets)
    assert counts.tolist() == [[3, 1], [3, 2]]  # head 1: patch 0 right, patch 3 wrong; patches 1 and 2 unscored
    assert ts.patch_accuracy(counts).tolist() == [1.0, 0.5]
    assert ts.patch_accuracy(torch.zeros(2, 1)).isnan().all()  # nothing scored: no accuracy, not 0


def test_training_smoke_run(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--tiny", "--vision-steps", "2", "--vision-batch-size", "2",
                              "--scenes", "6", "--steps", "3", "--batch-size", "2", "--turns", "3",
                              "--token-drop", "0.5", "--eval-every", "2", "--val-size", "4", "--test-size", "0"])
    report = ts.train(args)
    assert [h["step"] for h in report["history"]] == [2, 3]
    assert all(h["loss"] == h["loss"] for h in report["history"])  # finite, not NaN
    assert set(report["vision_stage"]["patch_accuracy"]) == set(sd.PATCH_TARGETS)
    assert json.loads((tmp_path / "training_report.json").read_text())["args"]["steps"] == 3
    model, processor = sm.load_shapes_model(tmp_path)
    assert model.dtype == torch.float32  # saved as float16, loaded back for the CPU
    res = sv.evaluate(model, processor, make_split("val", 3), progress=False)
    assert res.n == 3 and len(res.predictions) == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--token-drop", "2"])
    assert "argument --token-drop: expected a fraction in [0, 1], got 2" in capsys.readouterr().err


def test_steps_that_fit_the_time_limit():
    args = argparse.Namespace(time_limit=1.0, steps=10_000)
    # 50 steps in 6 s: 0.95 * 60 s - 6 s left, at 0.12 s a step, fit 425 more
    assert ts.steps_that_fit(args, 50, 6.0) == 475
    assert ts.steps_that_fit(args, 50, 120.0) == 51  # over the limit already: one more step ends the run
    assert ts.steps_that_fit(argparse.Namespace(time_limit=1.0, steps=100), 50, 6.0) == 100  # never past --steps


def test_a_time_limited_run_stops_early_and_reports_its_steps(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    common = ["--tiny", "--vision-steps", "0", "--scenes", "4", "--steps", "1000", "--batch-size", "2", "--turns", "2",
              "--eval-every", "0", "--test-size", "0"]
    # a budget spent by the first step: fitted at once (10% of it gone), one more step ends the run
    report = ts.train(parser.parse_args(["--out", str(tmp_path / "a"), *common, "--time-limit", "0.0001"]))
    assert report["language_steps"] == 2 and report["args"]["steps"] == 1000
    # an ample budget: fitted after TIMING_STEPS steps, then re-fitted every TIMING_STEPS steps, only ever shorter
    fits, answers = [], iter([10, 6, 99])
    monkeypatch.setattr(ts, "TIMING_STEPS", 2)
    monkeypatch.setattr(ts, "steps_that_fit", lambda args, done, seconds: fits.append(done) or next(answers))
    report = ts.train(parser.parse_args(["--out", str(tmp_path / "b"), *common, "--time-limit", "60"]))
    assert fits == [2, 4] and report["language_steps"] == 6
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(tmp_path), "--time-limit", "0"])


def test_training_runs_under_accelerate_autocast(tmp_path):
    # bf16 autocast through accelerate (CPU here). A subprocess: accelerate fixes one precision per process.
    cmd = [sys.executable, "-m", "vtoken.evals.shapes.training", "--out", str(tmp_path), "--tiny",
           "--vision-steps", "2", "--vision-batch-size", "2", "--scenes", "4", "--steps", "2", "--batch-size", "2",
           "--turns", "2", "--eval-every", "0", "--test-size", "0", "--mixed-precision", "bf16", "--cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert report["args"]["mixed_precision"] == "bf16" and report["machine"].endswith("cpu")
    assert all(h["loss"] == h["loss"] for h in report["history"])  # finite, not NaN
    assert sm.load_shapes_model(tmp_path)[0].dtype == torch.float32


def test_the_hard_task_trains_without_any_attention_target(tmp_path, monkeypatch):
    """ShapesVQA-Hard's model learns its attention from the answers alone: no forward pass asks for attention
    weights, none of the attention-target code runs, and the report's loss terms read no attention map."""
    def forbidden(*args, **kwargs):
        raise AssertionError("an attention target was computed")

    for name in ("attention_cross_entropy", "heads_loss", "count_attention", "answer_attention_targets"):
        monkeypatch.setattr(ts, name, forbidden)
    asked = []

    def spy(module, args, kwargs):
        asked.append((bool(kwargs.get("output_attentions")), module.config._attn_implementation))

    real_build = ts.build_model

    def build_spied(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(spy, with_kwargs=True)
        model.model.vision_tower.register_forward_pre_hook(spy, with_kwargs=True)
        return model

    monkeypatch.setattr(ts, "build_model", build_spied)
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    args = parser.parse_args(["--task", "hard", "--out", str(tmp_path), "--tiny", "--vision-steps", "2",
                              "--vision-batch-size", "2", "--scenes", "6", "--steps", "3", "--batch-size", "2",
                              "--turns", "3", "--focus-steps", "2", "--eval-every", "0", "--test-size", "0"])
    report = ts.train(args)
    assert len(asked) >= 5 and not any(wants for wants, _ in asked)
    assert {impl for _, impl in asked} == {"sdpa"}  # eager attention is only needed to read the weights
    assert [(t["stage"], t["name"]) for t in report["loss_terms"]] == [(1, "patch"), (2, "answer"), (2, "patch")]
    assert not any(t["attention"] for t in report["loss_terms"])
    model, processor = sm.load_shapes_model(tmp_path)
    assert "nearest" in processor.tokenizer.get_vocab()  # the hard task's words
    with pytest.raises(ValueError, match="--lookup-loss must be 0 with --task hard"):
        ts.train(parser.parse_args(["--task", "hard", "--out", str(tmp_path), "--lookup-loss", "1"]))


def test_tower_lr_trains_the_tower_in_stage_2_on_fresh_scenes(tmp_path, monkeypatch):
    """--tower-lr: no cache (every step renders its own scenes), the tower's weights move under the answer and patch
    losses, which the report says; with --tower-lr 0 the tower stays as it was."""
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    common = ["--task", "hard", "--tiny", "--vision-batch-size", "2", "--batch-size", "2", "--turns", "2",
              "--eval-every", "0", "--test-size", "0"]
    ts.train(parser.parse_args(["--out", str(tmp_path / "v"), "--vision-only", "--vision-steps", "1", *common]))
    before = sm.load_shapes_model(tmp_path / "v")[0].model.vision_tower.state_dict()

    def tower_change(out: str, *extra: str) -> float:
        ts.train(parser.parse_args(["--out", str(tmp_path / out), "--init", str(tmp_path / "v"), "--vision-steps", "0",
                                    "--steps", "2", "--scenes", "2", "--save-dtype", "float32", *extra, *common]))
        after = sm.load_shapes_model(tmp_path / out)[0].model.vision_tower.state_dict()
        return max((after[k] - before[k]).abs().max().item() for k in before)

    assert tower_change("frozen") == 0.0
    monkeypatch.setattr(ts, "cache_tower", lambda *a, **k: pytest.fail("--tower-lr must not cache the tower"))
    assert tower_change("tuned", "--tower-lr", "1e-3") > 1e-4
    report = json.loads((tmp_path / "tuned" / "training_report.json").read_text())
    assert [t["trains"] for t in report["loss_terms"]] == ["tower, projector, decoder", "tower, projector"]
    assert not any(t["attention"] for t in report["loss_terms"])
    with pytest.raises(ValueError, match="--tower-lr trains the tower in stage 2, which --vision-only skips"):
        ts.train(parser.parse_args(["--out", str(tmp_path / "x"), "--vision-only", "--tower-lr", "1e-3", *common]))


def test_a_continuation_resumes_the_patch_heads_it_was_saved_with(tmp_path):
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    common = ["--task", "hard", "--tiny", "--vision-batch-size", "2", "--vision-steps", "1", "--vision-only"]
    assert ts.train(parser.parse_args(["--out", str(tmp_path / "a"), *common]))["patch_heads"] == "fresh"
    saved = torch.load(tmp_path / "a" / ts.HEADS_FILE, weights_only=True)
    heads = ts.PatchHeads(saved["heads.0.weight"].shape[1], sm.TASKS["hard"].data.TARGET_CLASSES)
    assert ts.restore_patch_heads(heads, str(tmp_path / "a"))
    for k, v in heads.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    report = ts.train(parser.parse_args(["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), *common]))
    assert report["patch_heads"] == "restored from --init"
    assert not ts.restore_patch_heads(heads, None)
    with pytest.raises(ValueError, match=f"--init {tmp_path / 'a'}: its {ts.HEADS_FILE} does not fit"):
        ts.restore_patch_heads(ts.PatchHeads(heads.heads[0].in_features, sd.TARGET_CLASSES), str(tmp_path / "a"))

    # heads saved before the hard task's row and column targets existed: those two start fresh, the rest resume
    older = {k: v for k, v in saved.items() if int(k.split(".")[1]) < 5}
    torch.save(older, tmp_path / "a" / ts.HEADS_FILE)
    fresh = ts.PatchHeads(heads.heads[0].in_features, sm.TASKS["hard"].data.TARGET_CLASSES)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert ts.restore_patch_heads(fresh, str(tmp_path / "a")) == 5
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, older[k] if k in older else before[k], rtol=0, atol=0)
    report = ts.train(parser.parse_args(["--out", str(tmp_path / "c"), "--init", str(tmp_path / "a"), *common]))
    assert report["patch_heads"] == "restored from --init (5 of 7 targets; the rest fresh)"
    torch.save({k: v for k, v in saved.items() if not k.startswith("heads.1.")}, tmp_path / "a" / ts.HEADS_FILE)
    with pytest.raises(ValueError, match="does not fit this task's patch targets"):  # a gap is not a prefix
        ts.restore_patch_heads(fresh, str(tmp_path / "a"))


def test_shapes_vqa_reports_its_attention_targets(tmp_path):
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path)])
    args.lookup_loss = 1.0
    names = [t["name"] for t in ts.loss_terms(args) if t["attention"]]
    assert names == ["tower_count_attention", "decoder_lookup_attention"]


def test_the_focus_curriculum_shows_the_shapes_then_ever_more_background():
    on_shape = torch.zeros(196, dtype=torch.bool)
    on_shape[[3, 50, 51, 180]] = True
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for progress in (0.0, 0.3, 0.5, 0.75, 1.0):
        keep = ts.focused_tokens(on_shape, progress, gen)
        assert set(on_shape.nonzero().flatten().tolist()) <= set(keep.tolist())
        assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == len(keep)
        sizes.append(len(keep))
    assert sizes == [4, 4, 4, 4 + 96, 196]


def test_a_chain_of_runs_keeps_every_runs_loss_terms(tmp_path):
    """Stage 1 alone (--vision-only), then stage 2 from its checkpoint (--init): the second report holds the
    first, so the shipped checkpoint's report lists every loss term that shaped it."""
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    common = ["--task", "hard", "--tiny", "--vision-batch-size", "2", "--scenes", "4", "--batch-size", "2",
              "--turns", "2", "--eval-every", "0", "--test-size", "0"]
    first = ts.train(parser.parse_args(["--out", str(tmp_path / "v"), "--vision-only", "--vision-steps", "2",
                                        *common]))
    assert json.loads((tmp_path / "v" / "training_report.json").read_text())["loss_terms"] == first["loss_terms"]
    second = ts.train(parser.parse_args(["--out", str(tmp_path / "l"), "--init", str(tmp_path / "v"),
                                         "--vision-steps", "0", "--steps", "2", *common]))
    terms = ts.chain_loss_terms(second)
    assert [(t["stage"], t["name"]) for t in terms] == [(2, "answer"), (2, "patch"), (1, "patch")]
    assert second["init"]["args"]["vision_only"] and not any(t["attention"] for t in terms)


def test_the_shipped_hard_model_used_no_attention_loss():
    """The shipped ShapesVQA-Hard model's report: every loss term of every run in its chain (stage 1, then each
    --init continuation), none reading attention, and the test-split figure docs/shapes_vqa.md quotes."""
    report = json.loads((sm.TASKS["hard"].checkpoint / "training_report.json").read_text())
    assert report["test"]["n"] == 1000 and report["test"]["accuracy"] >= 0.85  # the 85% target
    terms = ts.chain_loss_terms(report)
    assert {(t["stage"], t["name"]) for t in terms} == {(1, "patch"), (2, "answer"), (2, "patch")}
    assert not any(t["attention"] or "attention" in t["name"] for t in terms)
    runs = ts.chain_runs(report)
    for run in runs:
        assert run["args"]["task"] == "hard" and run["args"]["lookup_loss"] == 0
    # newest first: P (tower trained in stage 2) and its stage 1 with row and column labels, N and M (tower trained in
    # stage 2), two stage-1 continuations (700, then 6000 steps), L, K, J and I (tower trained in stage 2), H, G, F, E,
    # C and B (tower frozen), and the first stage 1
    stages = [("stage 1" if run["args"]["vision_only"] else
               "tower too" if run["args"].get("tower_lr", 0.0) > 0 else "decoder") for run in runs]
    assert stages == (["tower too", "stage 1"] + ["tower too"] * 2 + ["stage 1"] * 2 + ["tower too"] * 4
                      + ["decoder"] * 6 + ["stage 1"])
    # P's stage 1 learned every per-patch label the recipe now has, row and column included
    assert set(runs[1]["vision_stage"]["patch_accuracy"]) == set(sm.TASKS["hard"].data.PATCH_TARGETS)
