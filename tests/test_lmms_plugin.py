"""The lmms-eval model ``vtoken`` on tiny random-weight LLaVA / LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL checkpoints
saved to disk with an offline character-level tokenizer: direct unit tests of the model class, then one end-to-end
``vtoken eval`` run."""

import glob
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="the lmms-eval plugin needs the eval extra: pip install 'vtoken[eval]'")

from lmms_eval.api.instance import Instance  # noqa: E402

from vtoken.evals.lmms.plugin import VTokenLMM, manifest  # noqa: E402
from vtoken.evals.lmms.tasks import write_task  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
QUESTION = "What colour is the square?"
# LLaVA-1.5's conversation format; the space before ASSISTANT is inside the template
TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() }}: {% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def char_tokenizer(marks: dict[str, str] | None = None):
    """One token per character, plus pad / BOS / EOS and the processor's special tokens (``marks``: attribute name
    -> token, by default LLaVA's ``<image>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    marks = marks or {"image_token": "<image>"}
    vocab = {c: i for i, c in enumerate([chr(i) for i in range(32, 127)] + ["\n"])}
    for special in ["<pad>", "<s>", "</s>", *marks.values()]:
        vocab[special] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens=marks)


def save_tiny(path, next_: bool = False) -> str:
    """A tiny LLaVA (112 px, 64 visual tokens) or LLaVA-NeXT (56 px tiles, AnyRes) with its processor."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tok = char_tokenizer()
    size = 56 if next_ else 112
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=size, patch_size=14)
    common = dict(tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                  num_additional_image_tokens=1, chat_template=TEMPLATE)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    if next_:
        pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=image_token_id, image_grid_pinpoints=pinpoints))
        processor = LlavaNextProcessor(image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pinpoints),
            **common)
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                          image_token_id=image_token_id))
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}), **common)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_llava"))


def square(name, size=(48, 40)):
    return Image.new("RGB", size, COLOURS[name])


DOCS = [{"image": square("red")}, {"image": square("green", (40, 90))}, {"image": square("blue", (90, 30))}]


def to_visual(doc):
    return [doc["image"]]


def load(path, **kwargs) -> VTokenLMM:
    model = VTokenLMM(pretrained=path, **{"device": "cpu", "dtype": "float32", **kwargs})
    model.task_dict = {"toy": {"test": DOCS}}
    return model


def request(kind, context, second, doc_id):
    return Instance(request_type=kind, arguments=(context, second, to_visual, doc_id, "toy", "test"), idx=0,
                    metadata={"task": "toy", "doc_id": doc_id, "repeats": 1})


GEN = {"max_new_tokens": 5, "do_sample": False, "until": ["\n\n"]}
GENERATE = [request("generate_until", QUESTION, GEN, i) for i in range(3)] + [
    request("generate_until", "Name the colour.", GEN, 1)]
LOGLIKELIHOOD = [request("loglikelihood", QUESTION, f" {name}", i) for i, name in enumerate(COLOURS)] + [
    request("loglikelihood", "Which colour?", " green or blue", 2), request("loglikelihood", QUESTION, "", 0)]


def pairs(results):
    return [r.text for r in results]


# -- construction and model_args ---------------------------------------------------------------------------------
def test_manifest_and_entry_point():
    m = manifest()
    assert m.model_id == "vtoken" and m.simple_class_path == "vtoken.evals.lmms.plugin.VTokenLMM"
    found = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "vtoken"]
    assert found, "no lmms_eval.models entry point 'vtoken': reinstall the package (pip install -e .)"
    assert found[0].load() is manifest


def test_model_args_from_strings(llava_dir):
    # lmms-eval turns "16" into 16 and "false" into False itself; constructed directly, strings are converted here
    model = load(llava_dir, method="todre", keep="16", stage2="false", rule="maxmin", batch_size="2")
    cfg = model.handle.config
    assert (cfg.keep, cfg.stage2, cfg.rule) == (16, False, "maxmin") and model.batch_size == 2
    assert load(llava_dir, method="dense").handle is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="todre", kepp=16), r"unknown model_args 'kepp'; valid: pretrained, method, .*fields of method "
                                    r"'todre': keep, "),
    (dict(method="none", keep=16), r"unknown model_args 'keep'.*method 'none' takes none"),
    (dict(method="tome"), r"unknown method 'tome'; use none, dense or one of .*todre"),
    (dict(method="todre", keep=0), r"keep=0 is out of range"),
    (dict(dtype="fp8"), r"dtype must be one of auto, float32"),
    (dict(batch_size="auto"), r"batch_size must be a positive integer"),
    (dict(loglikelihood="max"), r"loglikelihood must be one of mean_loss, sum_logprob"),
])
def test_bad_model_args(llava_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load(llava_dir, **kwargs)


def test_pretrained_is_required():
    with pytest.raises(ValueError, match="needs pretrained="):
        VTokenLMM(method="todre")


# -- prompts and visuals ---------------------------------------------------------------------------------------
def test_prompt_formats(llava_dir):
    model = load(llava_dir)
    assert model.prompt(QUESTION, 1) == f"USER: <image>\n{QUESTION} ASSISTANT:"  # the processor's chat template
    assert model.prompt(f"<image>\n{QUESTION}", 1) == f"USER: <image>\n{QUESTION} ASSISTANT:"  # placed by the task
    with pytest.raises(ValueError, match="holds 1 '<image>' placeholders for 2 images"):
        model.prompt(f"<image> {QUESTION}", 2)
    model.processor.chat_template = None
    assert model.prompt(QUESTION, 2) == f"USER: <image>\n<image>\n{QUESTION} ASSISTANT:"


def test_rejects_non_image_visuals(llava_dir):
    model = load(llava_dir)
    bad = Instance(request_type="generate_until", arguments=("q", GEN, lambda doc: ["clip.mp4"], 0, "toy", "test"),
                   idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="evaluates image tasks; task 'toy' gave a str visual"):
        model.generate_until([bad])


def test_multi_round_is_refused(llava_dir):
    with pytest.raises(NotImplementedError, match="does not support generate_until_multi_round"):
        load(llava_dir).generate_until_multi_round([])


# -- generate_until ------------------------------------------------------------------------------------------
def test_generate_until_batched_equals_single_and_prunes(llava_dir, tmp_path):
    stats = tmp_path / "stats.json"
    single = load(llava_dir, method="todre", keep=16)
    batched = load(llava_dir, method="todre", keep=16, batch_size=3, stats_path=str(stats))
    dense = load(llava_dir)
    one = single.generate_until(GENERATE)
    many = batched.generate_until(GENERATE)
    full = dense.generate_until(GENERATE)
    assert [r.text for r in one] == [r.text for r in many]
    assert all(isinstance(r.text, str) and 0 < r.token_counts.output_tokens <= 5 for r in many)
    # each row's LLM input lost exactly 64 - 16 visual tokens; lmms-eval logs these counts per sample
    assert [d.token_counts.input_tokens - p.token_counts.input_tokens for d, p in zip(full, many)] == [48] * 4
    last = batched.handle.stats  # the last batch's prefill
    assert set(last.visual_tokens_in) == {64} and last.visual_tokens_kept == [16] * len(last.visual_tokens_in)
    written = json.loads(stats.read_text())
    assert written["samples"] == 4 and written["prefills"] == 2 and written["config"] == {"keep": 16}
    assert written["visual_tokens_input"] == 4 * 64 and written["visual_tokens_llm"] == 4 * 16


def test_generate_until_honours_until_and_sampling(llava_dir):
    model = load(llava_dir)
    greedy = model.generate_until(GENERATE[:1])[0].text
    assert len(greedy) == 5
    cut = model.generate_until([request("generate_until", QUESTION, {"max_new_tokens": 5, "until": greedy[2]}, 0)])
    assert cut[0].text == greedy.split(greedy[2])[0]
    torch.manual_seed(1)
    sampled = [model.generate_until([request("generate_until", QUESTION, {"max_new_tokens": 8, "temperature": 5.0},
                                              0)])[0].text for _ in range(3)]
    assert len(set(sampled)) > 1  # temperature > 0 samples; greedy would repeat itself
    zero = request("generate_until", QUESTION, {"max_new_tokens": 5, "do_sample": True, "temperature": 0}, 0)
    assert model.generate_until([zero])[0].text == greedy


def test_until_works_with_a_word_level_tokenizer(tmp_path):
    # HF's stop_strings option raises "substring not found" on word-level vocabularies (ShapesVQA's model).
    from vtoken.evals.shapes import model as sm
    from vtoken.evals.shapes import training as ts

    processor = sm.build_processor()
    sm.build_model(processor, seed=0, **ts.TINY).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = load(str(tmp_path))
    free = model.generate_until([request("generate_until", QUESTION, {"max_new_tokens": 6}, 0)])[0]
    words = free.text.split()
    assert len(words) == 6 and free.token_counts.output_tokens == 6
    cut = model.generate_until([request("generate_until", QUESTION, {"max_new_tokens": 6, "until": [words[0]]},
                                        0)])[0]
    assert cut.text == "" and cut.token_counts.output_tokens == 1  # ended at the stop word, not after 6 tokens


def test_beam_search_counts_each_sample_once(llava_dir):
    # attn_topk (FastV) drops 48 of 64 visual tokens from decoder layer 2 of 4 on: 40 on average over layers
    model = load(llava_dir, method="attn_topk", keep=16, batch_size=2)
    beams = [request("generate_until", QUESTION, {"max_new_tokens": 3, "num_beams": 3}, i) for i in range(2)]
    out = model.generate_until(beams)
    assert len(model.handle.stats.visual_tokens_llm) == 6  # the prefill ran 2 rows x 3 beams
    assert [r.token_counts.input_tokens for r in out] == [len(f"USER: \n{QUESTION} ASSISTANT:") + 64] * 2
    assert (model.tally.samples, model.tally.visual_tokens_llm, model.tally.visual_tokens_layer_mean) == (2, 128, 80)


# -- loglikelihood ------------------------------------------------------------------------------------------
def manual_scores(model, requests):
    """Reference: unpatched full logits of prompt+continuation, one request at a time, read by position."""
    out = []
    for req in requests:
        context, continuation, _, doc_id, _, _ = req.args
        prompt = model.prompt(context, 1)
        inputs = model.processor(text=[prompt + continuation], images=[DOCS[doc_id]["image"]], return_tensors="pt")
        n = len(model.tokenizer(prompt + continuation).input_ids) - len(model.tokenizer(prompt).input_ids)
        with torch.no_grad():
            logits = model.model(**inputs).logits[0].float()
        ids = inputs["input_ids"][0]
        lp = logits[:-1].log_softmax(-1)[torch.arange(len(ids) - 1), ids[1:]][len(ids) - 1 - n :]
        out.append(float(lp.sum()))
    return out


def test_loglikelihood_matches_reference_and_batch_equals_single(llava_dir):
    dense = load(llava_dir, loglikelihood="sum_logprob", batch_size=4)
    got = pairs(dense.loglikelihood(LOGLIKELIHOOD))
    assert got[-1] == (0.0, True)  # empty continuation
    assert [g[0] for g in got[:-1]] == pytest.approx(manual_scores(dense, LOGLIKELIHOOD[:-1]), abs=1e-4)

    pruned_single = pairs(load(llava_dir, method="todre", keep=16).loglikelihood(LOGLIKELIHOOD))
    pruned_batch = pairs(load(llava_dir, method="todre", keep=16, batch_size=4).loglikelihood(LOGLIKELIHOOD))
    assert [p[0] for p in pruned_batch] == pytest.approx([p[0] for p in pruned_single], abs=1e-4)
    assert [p[1] for p in pruned_batch] == [p[1] for p in pruned_single]
    dense_loss = pairs(load(llava_dir, batch_size=4).loglikelihood(LOGLIKELIHOOD))
    assert all(abs(p[0] - d[0]) > 1e-4 for p, d in zip(pruned_batch[:-1], dense_loss[:-1]))  # pruning changes scores

    lengths = [1 + len(name) for name in COLOURS] + [len(" green or blue")]  # one character per token
    assert [d[0] for d in dense_loss[:-1]] == pytest.approx([-g[0] / n for g, n in zip(got, lengths)], abs=1e-5)


def test_keep_everything_scores_like_dense(llava_dir):
    dense = pairs(load(llava_dir, batch_size=4).loglikelihood(LOGLIKELIHOOD))
    keep_all = pairs(load(llava_dir, method="random", keep=1.0, batch_size=4).loglikelihood(LOGLIKELIHOOD))
    assert [k[0] for k in keep_all] == pytest.approx([d[0] for d in dense], abs=1e-5)


def test_llava_next(tmp_path):
    model = load(save_tiny(tmp_path / "next", next_=True), method="todre", keep=0.25, batch_size=3)
    texts = model.generate_until(GENERATE[:3])
    stats = model.handle.stats
    assert len(texts) == 3 and len(set(stats.visual_tokens_in)) > 1  # AnyRes: image sizes give different counts
    assert stats.visual_tokens_kept == [int(n * 0.25 + 0.5) for n in stats.visual_tokens_in]
    scores = pairs(model.loglikelihood(LOGLIKELIHOOD[:3]))
    assert all(s[0] > 0 for s in scores)


def save_tiny_onevision(path) -> str:
    """A tiny LLaVA-OneVision (SigLIP on 56 px tiles, AnyRes, a Qwen2 decoder) with its processor, offline."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = char_tokenizer({"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=56, patch_size=14, vision_use_head=False)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_2"))
    size = {"height": 56, "width": 56}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok, num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2", chat_template=TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_a_llava_onevision_checkpoint(tmp_path):
    """LLaVA-OneVision through the plugin: AnyRes counts from its processor, batched equals single, tokens counted."""
    tokens_in, kept = batched_equals_single(save_tiny_onevision(tmp_path / "onevision"))
    assert len(set(tokens_in)) > 1  # AnyRes: image sizes give different counts
    assert kept == [int(n * 0.25 + 0.5) for n in tokens_in]


def batched_equals_single(path: str) -> tuple[list[int], list[int]]:
    """divprune at 25% through the plugin, one request at a time and three at once: the same texts and scores.
    Returns the visual tokens in and kept per item of the batched generate_until."""
    single = load(path, method="divprune", keep=0.25)
    batched = load(path, method="divprune", keep=0.25, batch_size=3)
    one, many = (m.generate_until(GENERATE[:3]) for m in (single, batched))
    assert [r.text for r in one] == [r.text for r in many]
    stats = batched.handle.stats
    counts = list(stats.visual_tokens_in), list(stats.visual_tokens_kept)
    scores = pairs(batched.loglikelihood(LOGLIKELIHOOD[:3]))
    alone = pairs(single.loglikelihood(LOGLIKELIHOOD[:3]))
    assert [s[0] for s in scores] == pytest.approx([s[0] for s in alone], abs=1e-4)
    return counts


def save_tiny_internvl(path) -> str:
    """A tiny InternVL (112 px tiles of 16 tokens each, up to 4 tiles and a thumbnail, a Qwen2 decoder) with its
    processor, offline."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tok = char_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[112, 112], patch_size=[14, 14])
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5, tie_word_embeddings=False))
    size = {"height": 112, "width": 112}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4),
        video_processor=InternVLVideoProcessor(size=size), tokenizer=tok, image_seq_length=16,
        chat_template=TEMPLATE.replace("<image>\n", "<IMG_CONTEXT>\n"))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_an_internvl_checkpoint(tmp_path):
    """InternVL through the plugin: an image's tiles from its processor share one budget, batched equals single."""
    tokens_in, kept = batched_equals_single(save_tiny_internvl(tmp_path / "internvl"))
    assert all(n % 16 == 0 for n in tokens_in) and max(tokens_in) > 16  # tiles of 16 tokens, some images tiled
    assert kept == [n // 4 for n in tokens_in]


def save_tiny_qwen(path) -> str:
    """A tiny Qwen2-VL (2x2 merger, 14 px patches, images of 4..16 merged tokens) with its processor, offline."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    marks = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tok = char_tokenizer(marks)
    template = TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")
    sizes = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes),
                                 video_processor=Qwen2VLVideoProcessor(**sizes), tokenizer=tok, chat_template=template)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    ids = {k.replace("_token", "_token_id"): tok.convert_tokens_to_ids(v) for k, v in marks.items()}
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=dict(
        depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, embed_dim=32,
        hidden_size=64, mlp_ratio=2), **ids))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_a_qwen_vl_checkpoint(tmp_path):
    """Qwen2-VL through the plugin: M-RoPE prompts from its processor, batched equals single, tokens counted."""
    path = save_tiny_qwen(tmp_path / "qwen")
    single = load(path, method="todre", keep=0.25)
    batched = load(path, method="todre", keep=0.25, batch_size=3)
    dense = load(path)
    one, many, full = (m.generate_until(GENERATE[:3]) for m in (single, batched, dense))
    assert [r.text for r in one] == [r.text for r in many]
    stats = batched.handle.stats
    assert len(set(stats.visual_tokens_in)) > 1  # native resolution: image sizes give different counts
    assert stats.visual_tokens_kept == [int(n * 0.25 + 0.5) for n in stats.visual_tokens_in]
    assert all(d.token_counts.input_tokens > p.token_counts.input_tokens for d, p in zip(full, many))


# -- end to end: vtoken eval -> lmms-eval CLI -> entry point -> this class -----------------------------------
def test_vtoken_eval_end_to_end(llava_dir, tmp_path):
    examples = [(square(name), QUESTION, name) for name in COLOURS]
    write_task(tmp_path / "tasks", "vtoken_toy", examples, max_new_tokens=4)
    write_task(tmp_path / "tasks", "vtoken_toy_mc", examples, choices=list(COLOURS))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vtoken.cli", "eval", "--tasks", "vtoken_toy,vtoken_toy_mc",
           "--model_args", f"pretrained={llava_dir},method=todre,keep=16,attn_implementation=sdpa,dtype=float32,"
                           "device=cpu,batch_size=2",
           "--include_path", str(tmp_path / "tasks"), "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "vtoken_toy_mc  acc" in run.stdout and "16.0 into the LLM" in run.stdout

    (results_file,) = glob.glob(str(out / "*" / "*_results.json"))
    results = json.loads(open(results_file).read())["results"]
    assert 0.0 <= results["vtoken_toy"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["vtoken_toy_mc"]["acc,none"] <= 1.0
    samples = [json.loads(line) for line in open(glob.glob(str(out / "*" / "*_samples_vtoken_toy.jsonl"))[0])]
    assert sorted(s["target"] for s in samples) == sorted(COLOURS) and all(isinstance(s["filtered_resps"], str)
                                                                            for s in samples)
    # pruning happened: the model's own tally, and the per-sample LLM input (text + 16 visual tokens, not 64)
    (stats_file,) = glob.glob(str(out / "vtoken_stats_*.json"))
    stats = json.loads(open(stats_file).read())
    assert stats["method"] == "todre" and stats["visual_tokens_llm"] * 4 == stats["visual_tokens_input"]
    text_tokens = len(f"USER: \n{QUESTION} ASSISTANT:")
    assert [s["token_counts"][0]["input_tokens"] for s in samples] == [text_tokens + 16] * 3
    mc = [json.loads(line) for line in open(glob.glob(str(out / "*" / "*_samples_vtoken_toy_mc.jsonl"))[0])]
    assert len(mc) == 3 and all(len(s["filtered_resps"]) == 3 for s in mc)  # three scored choices per question
