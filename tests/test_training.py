"""The TokenFLEX trainer: it learns, resumes exactly, draws its token counts as configured, and runs end to end from
the command line on a tiny model and generated data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import tiny_llava

import vtoken
from vtoken import cli
from vtoken.methods.tokenflex import TokenFlexProjector
from vtoken.training import Sample, TrainConfig, checkpoints, draw_count, train_tokenflex

ANSWERS = (20, 21, 22)  # one answer token per class


def toy_data(n: int = 24) -> list[Sample]:
    """Each view's 8 x 8 features carry its class as a shifted mean; the answer, the class's token, comes right
    after the image (so a random frozen LLM reads it from the last visual token: a task a few steps can learn)."""
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(len(ANSWERS), 32, generator=gen)
    samples = []
    for i in range(n):
        label = i % len(ANSWERS)
        features = torch.randn(64, 32, generator=gen) + 2 * directions[label]
        samples.append(Sample([1, 5], [([ANSWERS[label], 2], [ANSWERS[label], -100])], features=features))
    return samples


def toy_model():
    """A tiny random LLaVA whose output head is scaled up: with the init's 0.02-scale head, the normalised last state
    cannot make any token likely (the loss floor would be ~3.3 nats), which a trained LLM can."""
    model = tiny_llava()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


FAST = dict(batch_size=6, lr=1e-2, warmup=0, progress=False, save_every=0)


def test_a_few_steps_decrease_the_loss_on_a_toy_task():
    model = toy_model()
    result = train_tokenflex(model, toy_data(), TrainConfig(steps=30, token_counts={4: 1, 16: 1}, **FAST))
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert {h["num_tokens"] for h in result.history} == {4, 16}
    assert not any(p.requires_grad for p in model.parameters())  # the model stays frozen


def test_the_trained_projector_answers_the_toy_questions():
    from vtoken.training import packed_inputs

    model, data = toy_model(), toy_data()
    projector = train_tokenflex(model, data, TrainConfig(steps=40, token_counts={16: 1}, **FAST)).projector
    with torch.no_grad():
        visual = projector(torch.stack([s.features for s in data]), 16)
        embeds, mask, positions, labels = packed_inputs(model, [(s.prefix, s.turns) for s in data], visual)
        predicted = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits.argmax(-1)
    answer_at = 2 + 16 - 1  # the last visual token predicts the answer
    hits = sum(int(predicted[i, answer_at]) == s.turns[0][0][0] for i, s in enumerate(data))
    assert labels[0, answer_at + 1] == data[0].turns[0][0][0]
    assert hits >= 0.9 * len(data)


def test_checkpoint_resume_continues_exactly(tmp_path):
    config = TrainConfig(steps=4, token_counts={4: 1, 16: 2}, **{**FAST, "save_every": 2})
    straight = train_tokenflex(tiny_llava(), toy_data(), config, out=tmp_path / "a")
    train_tokenflex(tiny_llava(), toy_data(), config, out=tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000004")  # as if it had stopped after step 2
    shutil.rmtree(tmp_path / "b" / "projector")
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["step-000002"]
    resumed = train_tokenflex(tiny_llava(), toy_data(), config, out=tmp_path / "b", resume=True)
    assert resumed.history == straight.history
    a = TokenFlexProjector.load(tmp_path / "a" / "projector").state_dict()
    b = TokenFlexProjector.load(tmp_path / "b" / "projector").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint's projector is usable on its own
    TokenFlexProjector.load(tmp_path / "a" / "checkpoints" / "step-000002" / "projector")


def test_resume_refuses_other_settings_and_a_missing_checkpoint(tmp_path):
    config = TrainConfig(steps=2, token_counts={4: 1}, **FAST)
    with pytest.raises(ValueError, match="no checkpoint under"):
        train_tokenflex(tiny_llava(), toy_data(), config, out=tmp_path, resume=True)
    train_tokenflex(tiny_llava(), toy_data(), config, out=tmp_path)
    other = TrainConfig(steps=2, token_counts={16: 1}, **FAST)
    with pytest.raises(ValueError, match=r"cannot resume .*\(token_counts: \{4: 1.0\} -> \{16: 1.0\}"):
        train_tokenflex(tiny_llava(), toy_data(), other, out=tmp_path, resume=True)


def test_token_counts_follow_their_weights_and_the_default_scales_to_the_grid():
    counts = {16: 0.2, 36: 0.3, 64: 0.5}
    draws = [draw_count(counts, 0, step) for step in range(4000)]
    for N, weight in counts.items():
        assert abs(draws.count(N) / len(draws) - weight) < 0.03
    assert draws == [draw_count(counts, 0, step) for step in range(4000)]  # a function of (seed, step) only
    result = train_tokenflex(tiny_llava(), toy_data(), TrainConfig(steps=12, **FAST))
    assert {h["num_tokens"] for h in result.history} <= {4, 16, 25}  # 8 x 8 grid: sides 8, 12, 16 of 27 -> 2, 4, 5


@pytest.mark.parametrize("changes,message", [
    (dict(steps=0), r"steps=0 is out of range"),
    (dict(lr=0.0), r"lr=0.0 is out of range"),
    (dict(token_counts={10: 1.0}), "token_counts: count=10 is not a perfect square"),
    (dict(mixed_precision="fp8"), "mixed_precision='fp8' is not allowed"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)
    with pytest.raises(ValueError, match="count=81 is larger than the 64 patch tokens"):
        train_tokenflex(tiny_llava(), toy_data(), TrainConfig(steps=1, token_counts={81: 1.0}, **FAST))
    with pytest.raises(ValueError, match="projector maps 16-wide vision features"):
        train_tokenflex(tiny_llava(), toy_data(), TrainConfig(steps=1, **FAST), projector=TokenFlexProjector(16, 64))


def test_the_llm_trains_too_when_asked(tmp_path):
    model = tiny_llava()
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    llm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    config = TrainConfig(steps=3, token_counts={16: 1}, train_llm=True, llm_lr=1e-3, **FAST)
    train_tokenflex(model, toy_data(), config, out=tmp_path)
    assert all(torch.equal(v, tower[k]) for k, v in model.model.vision_tower.state_dict().items())
    assert any(not torch.equal(v, llm[k]) for k, v in model.model.language_model.state_dict().items())
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "projector" / "config.json").is_file()


def write_jsonl(tmp_path, n: int = 6) -> str:
    from vtoken.evals.shapes.data import make_split

    rows = []
    for e in make_split("train", n):
        path = tmp_path / f"img{e.index}.png"
        e.image.save(path)
        rows.append({"image": path.name, "prompt": e.prompt, "answer": e.answer,
                     "turns": [{"prompt": f"{e.question} ASSISTANT:", "answer": e.answer}]})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(data)


def test_train_tokenflex_command_end_to_end(tiny_shapes_checkpoint, tmp_path, capsys):
    """Generated data -> `vtoken train-tokenflex` -> a projector that patches the model; --resume continues."""
    data, out = write_jsonl(tmp_path), tmp_path / "run"
    base = ["train-tokenflex", "--model", str(tiny_shapes_checkpoint), "--data", data, "--out", str(out),
            "--steps", "4", "--batch-size", "2", "--save-every", "2", "--token-counts", "16:1,36:1", "--quiet"]
    assert cli.main(base) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert [p.name for p in checkpoints(out)] == ["step-000002", "step-000004"]
    shutil.rmtree(out / "checkpoints" / "step-000004")
    assert cli.main(base + ["--resume"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out

    from vtoken.evals.shapes.data import make_split
    from vtoken.evals.shapes.evaluate import prompt_inputs
    from vtoken.evals.shapes.model import load_shapes_model

    model, processor = load_shapes_model(tiny_shapes_checkpoint)
    inputs = prompt_inputs(processor, make_split("test", 2), model.device, model.dtype)
    with vtoken.patch(model, "tokenflex", num_tokens=36, projector=str(out / "projector")) as handle:
        tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.stats.visual_tokens_llm == [36, 36]
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 2


def test_bad_command_lines_are_usage_errors(tiny_shapes_checkpoint, tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train-tokenflex", "--model", str(tiny_shapes_checkpoint), "--out", str(tmp_path / "o"), *argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "--token-counts: token_counts: count=50 is not a perfect square" in error(
        ["--data", "x.jsonl", "--token-counts", "50"])
    assert "data=" in error(["--data", str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "prompt": "USER: <image>"}) + "\n")
    assert "line 1: needs string fields image, prompt and answer; missing or not a string: answer" in error(
        ["--data", str(bad)])
    assert "steps=0 is out of range" in error(["--data", str(bad), "--steps", "0"])


def test_the_proof_command_runs_end_to_end_and_reuses_its_projectors(tiny_shapes_checkpoint, tmp_path, capsys):
    """`vtoken tokenflex-proof` at toy size: trains, evaluates every model at every N, writes JSON + PNG; --reuse
    evaluates the saved projectors again without training."""
    common = ["tokenflex-proof", "--model", str(tiny_shapes_checkpoint), "--n", "4", "--batch", "4",
              "--eval-counts", "16,36", "--flex-counts", "16,36", "--fixed", "36", "--projectors",
              str(tmp_path / "proj"), "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"),
              "--quiet", "--threads", "1"]
    train = ["--steps", "2", "--align-steps", "2", "--scenes", "8", "--batch-size", "2", "--turns", "2"]
    assert cli.main(common + train) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    cells = {(r["model"], r["num_tokens"]) for r in report["results"]}
    models = ("tokenflex", "fixed-36", "tokenflex (training-free)", "pool", "todre")
    assert cells == {(m, N) for m in models for N in (16, 36)}
    assert all(r["visual_tokens_llm"] <= r["num_tokens"] for r in report["results"])
    assert report["training"]["tokenflex"]["counts"] == {"16": 0.5, "36": 0.5}  # equal weights, normalised
    assert (tmp_path / "p.png").stat().st_size > 0 and "N=36" in capsys.readouterr().out
    saved = TokenFlexProjector.load(tmp_path / "proj" / "fixed-36")
    assert saved.vision_width == 32 and saved.llm_width == 32
    weights = tmp_path / "proj" / "fixed-36" / "projector.pt"
    written = weights.stat().st_mtime_ns
    assert cli.main(common + train + ["--reuse"]) == 0
    assert weights.stat().st_mtime_ns == written  # evaluated again, not trained again
    again = json.loads((tmp_path / "p.json").read_text())
    assert [r["accuracy"] for r in again["results"]] == [r["accuracy"] for r in report["results"]]
    with pytest.raises(SystemExit):  # projectors trained with other settings are not taken
        cli.main(common + ["--reuse"])
    with pytest.raises(SystemExit):  # a fixed count the evaluation does not visit is a usage error
        cli.main(common + train + ["--reuse", "--fixed", "64"])


def test_the_alignment_stage_brings_the_projector_to_the_models_own():
    """Before any answer loss, the projector regresses the model's projector on the full grid (no LLM pass)."""
    from vtoken.training import align_to_host

    model, data = tiny_llava(), toy_data()
    config = TrainConfig(steps=1, align_steps=60, token_counts={4: 1}, **FAST)
    torch.manual_seed(0)
    projector = TokenFlexProjector(32, 64)
    losses = align_to_host(projector, model, data, config, 64, torch.device("cpu"), progress=False)
    assert len(losses) == 60 and losses[-1] < 0.1 * losses[0]
    features = torch.stack([s.features for s in data[:4]])
    with torch.no_grad():
        target = model.model.multi_modal_projector(features)
        error = (projector(features, 64) - target).pow(2).mean() / target.var()
    assert error < 0.2
    assert len(train_tokenflex(model, data, config).align_losses) == 60  # the trainer runs it first


def test_the_schedule_matches_transformers_and_follows_a_moving_horizon():
    from transformers import get_cosine_schedule_with_warmup

    from vtoken.training import optimizer_for

    def lrs(optimizer, scheduler, steps):
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    params = [torch.nn.Parameter(torch.zeros(2))]
    ours = lrs(*optimizer_for([{"params": params, "lr": 1.0}], warmup=5, steps=40), 40)
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    assert ours == lrs(reference, get_cosine_schedule_with_warmup(reference, 5, 40), 40)
    # a run shortened to 20 steps (under --time-limit) decays to 0 at step 20, not 40
    horizon = [40]
    optimizer, scheduler = optimizer_for([{"params": params, "lr": 1.0}], warmup=5, steps=lambda: horizon[0])
    head = lrs(optimizer, scheduler, 10)
    horizon[0] = 20
    tail = lrs(optimizer, scheduler, 11)
    assert head == ours[:10] and tail[-1] == 0.0 and tail[0] > tail[5] > tail[-1]


def test_bad_training_data_is_reported_line_by_line_before_anything_is_written(tiny_shapes_checkpoint, tmp_path,
                                                                                capsys):
    good = json.loads(open(write_jsonl(tmp_path, n=1)).readline())
    (tmp_path / "not_an_image.png").write_text("hello")
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps([good]),
        json.dumps({**good, "turns": "What colour?"}),
        json.dumps({**good, "turns": [{"prompt": "Again?"}]}),
        json.dumps({**good, "image": "missing.png"}),
        json.dumps({**good, "image": "not_an_image.png"}),
        json.dumps({**good, "prompt": "USER: no image here ASSISTANT:"}),
        json.dumps({**good, "prompt": "USER: <image><image> twice ASSISTANT:"}),
        json.dumps({key: value for key, value in good.items() if key != "answer"}),
    ]
    data, out = tmp_path / "bad.jsonl", tmp_path / "run"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-tokenflex", "--model", str(tiny_shapes_checkpoint), "--data", str(data), "--out", str(out),
                  "--steps", "1", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "9 bad line(s)" in err
    for expected in ("line 2: not JSON", "line 3: expected a JSON object", "line 4: turns must be a list",
                     "line 5: turn 1 needs string fields prompt and answer", "line 6: image 'missing.png' not found",
                     "line 7: image 'not_an_image.png' cannot be read", "line 8: the prompt must hold the image token",
                     "it holds it 0 times", "line 9: the prompt must hold", "it holds it 2 times",
                     "line 10: needs string fields image, prompt and answer; missing or not a string: answer"):
        assert expected in err, expected
    assert "line 1:" not in err and not out.exists()


def test_at_most_twenty_bad_lines_are_listed(tmp_path):
    from vtoken.evals.shapes.model import build_processor
    from vtoken.training import JsonlData

    data = tmp_path / "bad.jsonl"
    data.write_text("[]\n" * 25)
    with pytest.raises(ValueError, match=r"25 bad line\(s\)(.|\n)*line 20:(.|\n)*\.\.\. and 5 more") as info:
        JsonlData(data, build_processor())
    assert "line 21:" not in str(info.value)
