"""ShapesVQA model side: processor and tokenizer, packed prompts, and the shipped checkpoints' accuracy."""

import argparse
import json

import numpy as np
import pytest
import shapes_reference
import torch

from vtoken.evals.shapes import data as sd
from vtoken.evals.shapes import evaluate as sv
from vtoken.evals.shapes import model as sm
from vtoken.evals.shapes import training as ts
from vtoken.evals.shapes.data import make_split, random_scene, render, scene_questions

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
    from vtoken.evals.shapes.data import RELATIONS, evidence_patches, patch_targets

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
    assert pruned.accuracy >= 0.95 * dense.accuracy, (pruned.summary(), dense.summary())  # target: 95% of dense


def test_evaluate_is_batch_invariant_and_matches_the_manual_path(shipped):
    model, processor = shipped
    examples = make_split("test", 12)
    batched = sv.evaluate(model, processor, examples, batch_size=12, progress=False)
    single = sv.evaluate(model, processor, examples[:4], batch_size=1, progress=False)
    assert single.predictions == batched.predictions[:4]
    # keep-all through the hand-built inputs_embeds path gives the same answers as plain generate
    manual = shapes_reference.evaluate_reduced(model, processor, examples, lambda feats, ctx: feats, batch_size=5,
                                               progress=False)
    assert manual.predictions == batched.predictions and manual.visual_tokens == 196
    # a reducer really shortens what the LLM sees
    half = shapes_reference.evaluate_reduced(model, processor, examples[:4], lambda feats, ctx: feats[::2],
                                             progress=False)
    assert half.visual_tokens == 98


def test_cls_attention_is_a_distribution_over_patches(shipped):
    model, processor = shipped
    pixels = processor.image_processor([e.image for e in make_split("val", 2)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        att = shapes_reference.cls_attention(model, pixels)
    assert att.shape == (2, 196) and (att >= 0).all() and (att.sum(1) <= 1 + 1e-5).all()


def test_export_split_writes_jsonl_and_pngs(tmp_path):
    path = sv.export_split("test", 3, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["answer"] for r in rows] == [e.answer for e in make_split("test", 3)]
    assert all((tmp_path / "images" / f"test_{i:05d}.png").is_file() for i in range(3))
