"""Patch a LLaVA with ToDRE and call ``generate()`` on a batch, unchanged.

Runs offline on the ShapesVQA LLaVA that ships with vtoken (a 2 M-parameter HF ``LlavaForConditionalGeneration``
trained on pictures of coloured shapes). With a real checkpoint only the loading line changes, e.g.
``LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")`` and ``AutoProcessor`` for it.

    python examples/01_llava_generate.py
"""

import torch

import vtoken
from vtoken.evals.shapes.evaluate import load_shapes_model, make_split

model, processor = load_shapes_model()  # (LlavaForConditionalGeneration, LlavaProcessor), nothing downloaded
questions = make_split("test", 8)  # ShapesVQA test questions: PIL image, question, one-word answer

# A left-padded batch built the usual way: the chat template, then the processor.
prompts = [
    processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}],
        add_generation_prompt=True,
    )
    for q in questions
]
inputs = processor(images=[q.image for q in questions], text=prompts, padding=True, padding_side="left",
                   return_tensors="pt")


def answers() -> list[str]:
    """Greedy answers of whatever ``model`` currently is (dense or patched): plain user code."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


dense = answers()

# One call patches this model instance; generate() above does not change.
handle = vtoken.patch(model, "todre", keep=0.1)  # float = fraction of the visual tokens kept, int = a count
pruned = answers()

stats = handle.stats  # what the last prefill did
print(f"ToDRE kept {stats.visual_tokens_kept[0]} of {stats.visual_tokens_in[0]} visual tokens per image; "
      f"selection took {1000 * stats.selection_time_s:.1f} ms for the batch of {len(questions)}")
print(f"sample 0 enters the LLM with {stats.visual_tokens_llm[0]} visual tokens; its sequence length per decoder "
      f"layer is {[layer[0] for layer in stats.tokens_per_layer]} (dense: {int(inputs['attention_mask'][0].sum())})")
print()
print(f"{'question':<48} {'truth':<9} {'dense':<9} todre 10%")
for q, d, p in zip(questions, dense, pruned):
    print(f"{q.question:<48} {q.answer:<9} {d.strip():<9} {p.strip()}")
right = sum(p.strip() == q.answer for q, p in zip(questions, pruned))
print(f"\ntodre at 10% of the visual tokens: {right}/{len(questions)} right")

handle.remove()  # the model is exactly the original again
print("after remove(), the answers equal the dense ones:", answers() == dense)
