"""ShapesVQA model side: processor/tokenizer, training smoke run, and the shipped checkpoint's accuracy."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vtoken.evals import shapes_data as sd
from vtoken.evals import shapes_model as sm
from vtoken.evals import shapes_vqa as sv
from vtoken.evals import train_shapes as ts
from vtoken.evals.shapes_data import make_split, random_scene, render, scene_questions

# Regression floor for the shipped checkpoint on the first 96 test questions: the 85% target plus margin
# (it measures 97.9% here and 99.0% on the 1000-question test split, docs/shapes_vqa.md).
ACCURACY_FLOOR = 0.9
# The same for the shipped ShapesVQA-Hard checkpoint: it measures 85.4% here (88.1% on the 1000-question test split,
# where the 85% target applies); 96 questions have a standard error of about 3.6 points.
HARD_ACCURACY_FLOOR = 0.8


@pytest.fixture(scope="module")
def processor():
    return sm.build_processor()


@pytest.fixture(scope="module")
def shipped():
    return sm.load_shapes_model()


def test_processor_expands_image_to_the_models_token_count(processor, tmp_path):
    model = sm.build_model(processor, **ts.TINY)
    examples = make_split("test", 4)
    enc = processor(images=[e.image for e in examples], text=[e.prompt for e in examples], padding=True,
                    return_tensors="pt")
    n = sm.num_visual_tokens(model)
    assert n == 196 == model.config.image_seq_length
    assert ((enc["input_ids"] == model.config.image_token_id).sum(1) == n).all()
    tok = processor.tokenizer
    assert (enc["input_ids"] != tok.unk_token_id).all()
    assert (enc["input_ids"][:, -1] == tok.convert_tokens_to_ids(":")).all()  # left padded: prompts end together
    assert (enc["input_ids"][enc["attention_mask"].bool()].view(-1)[0] == tok.bos_token_id)
    model(**enc)  # counts agree, or LLaVA raises "Image features and image tokens do not match"
    # save_pretrained round trip: same ids, same chat-template prompt
    processor.save_pretrained(tmp_path)
    again = type(processor).from_pretrained(tmp_path)
    assert torch.equal(again(images=[examples[0].image], text=[examples[0].prompt], return_tensors="pt")["input_ids"],
                       enc["input_ids"][0:1, -enc["attention_mask"][0].sum() :])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": examples[0].question}]}]
    assert again.apply_chat_template(messages, add_generation_prompt=True).split() == examples[0].prompt.split()


def test_each_packed_turn_is_the_evaluation_prompt(processor):
    examples = make_split("test", 3)
    qa = [(e.type, e.question, e.answer) for e in examples]
    prefix, turns = ts.packed_ids(processor.tokenizer, qa)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for e, (ids, labels) in zip(examples, turns):
        prompt = processor(images=[e.image], text=[e.prompt])["input_ids"][0]
        n_prompt = len(prompt) - len(prefix) - 196
        assert prefix + [image_id] * 196 + ids[:n_prompt] == list(prompt)
        answer = [t for t, lab in zip(ids, labels) if lab != -100]
        assert answer == ids[n_prompt:] and [lab for lab in labels if lab != -100] == answer
        assert processor.tokenizer.convert_ids_to_tokens(answer) == [e.answer, "</s>"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_single_question_forwards(processor, attn):
    """The packing mask and positions make each turn see exactly what the evaluation prompt shows."""
    model = sm.build_model(processor, **ts.TINY)
    model.set_attn_implementation(attn)
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(2)]
    samples = [ts.packed_ids(processor.tokenizer, scene_questions(s, rng, n)) for s, n in zip(scenes, (3, 2))]
    pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    embed = model.get_input_embeddings()
    with torch.no_grad():
        feats = list(model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output)
        feats[1] = feats[1][::3]  # a reduced sample (token-drop augmentation) in the same batch
        embeds, mask, positions, labels = ts.packed_inputs(model, samples, feats)
        packed = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        for i, (prefix, turns) in enumerate(samples):
            start = len(prefix) + len(feats[i])
            for ids, labs in turns:
                alone = torch.cat([embed(torch.tensor(prefix)), feats[i], embed(torch.tensor(ids))])[None]
                torch.testing.assert_close(packed[i, start : start + len(ids)],
                                           model(inputs_embeds=alone).logits[0, -len(ids) :], atol=1e-4, rtol=1e-4)
                assert labels[i, start : start + len(ids)].tolist() == labs
                start += len(ids)


def test_lookup_targets_point_from_the_last_prompt_token_to_the_evidence(processor):
    from vtoken.evals.shapes_data import RELATIONS, evidence_patches, patch_targets

    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(3)]
    qas = [scene_questions(s, rng, 8) for s in scenes]
    samples = [ts.packed_ids(processor.tokenizer, qa) for qa in qas]
    targets = np.stack([patch_targets(s, 16) for s in scenes])
    kept = [torch.arange(196), torch.arange(0, 196, 2), torch.arange(0, 196, 3)]
    length = max(len(p) + len(k) + sum(len(ids) for ids, _ in turns) for (p, turns), k in zip(samples, kept))
    rows_b, rows_q, lookup, sides, words = ts.answer_attention_targets(qas, samples, kept, targets, length,
                                                                       processor.tokenizer)
    assert len(rows_b) == sum(len(qa) for qa in qas)
    torch.testing.assert_close(lookup.sum(-1), torch.ones(len(rows_b)))
    torch.testing.assert_close(sides.sum(-1), torch.ones(len(rows_b), len(RELATIONS)))
    colon = processor.tokenizer.convert_tokens_to_ids(":")
    row = 0
    for b, (qa, (prefix, turns)) in enumerate(zip(qas, samples)):
        start = len(prefix) + len(kept[b])
        for (qtype, _, _, meta), (ids, labels) in zip(qa, turns):
            q = int(rows_q[row]) - start
            assert ids[q] == colon and labels[q + 1] != -100  # the token that predicts the answer
            evidence = evidence_patches(qtype, meta, targets[b])[kept[b].numpy()]
            image = lookup[row, len(prefix) : len(prefix) + len(kept[b])]
            assert ((image > 0).numpy() == evidence).all() and (lookup[row, 0] == 1.0) == (not evidence.any())
            if qtype == "relation":
                assert torch.equal(sides[row, RELATIONS.index(meta["relation"])], lookup[row])
            else:
                assert (sides[row, :, 0] == 1.0).all()
            read = [processor.tokenizer.convert_ids_to_tokens([ids[int(p) - start]])[0]
                    for p in (words[row, 0] > 0).nonzero().flatten() if p > 0]
            assert read == ([meta["referent"][0]] if qtype == "relation" else
                            [] if qtype == "color" else [meta["color"]])  # head 0 reads the colour word
            start += len(ids)
            row += 1


def test_tower_cache_is_what_the_projector_receives(processor):
    model = sm.build_model(processor, **ts.TINY).eval()
    args = argparse.Namespace(seed=0, scenes=5, task="shapes")
    from accelerate import Accelerator

    accelerator = Accelerator()
    model.to(accelerator.device)
    hidden, scenes, targets = ts.cache_tower(args, accelerator, model, processor, chunk=2)
    assert hidden.shape[:2] == (5, 196) and targets.shape == (5, len(sd.PATCH_TARGETS), 196) and len(scenes) == 5
    pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    pixels = pixels.to(accelerator.device)
    with torch.no_grad():
        direct = torch.stack(list(model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output))
        cached = model.model.multi_modal_projector(hidden.float())
    torch.testing.assert_close(cached, direct, atol=2e-3, rtol=2e-3)  # float16 cache


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
    cmd = [sys.executable, "-m", "vtoken.evals.train_shapes", "--out", str(tmp_path), "--tiny", "--vision-steps", "2",
           "--vision-batch-size", "2", "--scenes", "4", "--steps", "2", "--batch-size", "2", "--turns", "2",
           "--eval-every", "0", "--test-size", "0", "--mixed-precision", "bf16", "--cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert report["args"]["mixed_precision"] == "bf16" and report["machine"].endswith("cpu")
    assert all(h["loss"] == h["loss"] for h in report["history"])  # finite, not NaN
    assert sm.load_shapes_model(tmp_path)[0].dtype == torch.float32


def test_shipped_model_is_small_and_accurate(shipped):
    model, processor = shipped
    files = [p for p in sm.ASSET_DIR.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    assert model.config.text_config.num_hidden_layers >= 4
    assert model.config.vision_feature_layer == -1 and model.config.vision_feature_select_strategy == "default"
    res = sv.evaluate(model, processor, make_split("test", 96), batch_size=48, progress=False)
    assert res.accuracy >= ACCURACY_FLOOR, res.summary()


def test_shipped_hard_model_is_small_accurate_and_batch_invariant():
    model, processor = sm.load_task_model("hard")
    files = [p for p in sm.TASKS["hard"].checkpoint.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    assert not (sm.TASKS["hard"].checkpoint / "patch_heads.pt").exists()  # training only, not shipped
    assert model.config.text_config.hidden_size == sm.TASKS["hard"].text["hidden_size"]
    examples = sm.TASKS["hard"].data.make_split("test", 96)
    res = sv.evaluate(model, processor, examples, batch_size=48, progress=False)
    assert res.accuracy >= HARD_ACCURACY_FLOOR, res.summary()
    single = sv.evaluate(model, processor, examples[:4], batch_size=1, progress=False)
    assert single.predictions == res.predictions[:4]


def test_todre_keeps_the_shipped_models_accuracy_at_a_quarter_of_the_tokens(shipped):
    import vtoken

    model, processor = shipped
    examples = make_split("test", 96)
    dense = sv.evaluate(model, processor, examples, batch_size=48, progress=False)
    with vtoken.patch(model, "todre", keep=0.25) as handle:
        pruned = sv.evaluate(model, processor, examples, batch_size=48, progress=False)
        assert handle.stats.visual_tokens_kept == [49] * 48  # the last batch
    assert pruned.accuracy >= 0.95 * dense.accuracy, (pruned.summary(), dense.summary())  # the target


def test_evaluate_is_batch_invariant_and_matches_the_manual_path(shipped):
    model, processor = shipped
    examples = make_split("test", 12)
    batched = sv.evaluate(model, processor, examples, batch_size=12, progress=False)
    single = sv.evaluate(model, processor, examples[:4], batch_size=1, progress=False)
    assert single.predictions == batched.predictions[:4]
    # keep-all through the hand-built inputs_embeds path gives the same answers as plain generate
    manual = sv.evaluate_reduced(model, processor, examples, lambda feats, ctx: feats, batch_size=5, progress=False)
    assert manual.predictions == batched.predictions and manual.visual_tokens == 196
    # a reducer really shortens what the LLM sees
    half = sv.evaluate_reduced(model, processor, examples[:4], lambda feats, ctx: feats[::2], progress=False)
    assert half.visual_tokens == 98


def test_cls_attention_is_a_distribution_over_patches(shipped):
    model, processor = shipped
    pixels = processor.image_processor([e.image for e in make_split("val", 2)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        att = sv.cls_attention(model, pixels)
    assert att.shape == (2, 196) and (att >= 0).all() and (att.sum(1) <= 1 + 1e-5).all()


def test_export_split_writes_jsonl_and_pngs(tmp_path):
    path = sv.export_split("test", 3, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["answer"] for r in rows] == [e.answer for e in make_split("test", 3)]
    assert all((tmp_path / "images" / f"test_{i:05d}.png").is_file() for i in range(3))


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
    assert report["test"]["n"] == 1000 and report["test"]["accuracy"] >= 0.85  # the target
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
