"""The host cost of every method, counted exactly (``vtoken overhead``), pinned so that a regression fails CI.

On a GPU at batch 1 each aten op is a kernel launch and each device->host sync a stall; both are deterministic, so
the CPU counts them as a GPU would run them (Triton kernels through the interpreter, each launch one op). Budgets,
per ``generate()`` on the full-depth tiny models (32 decoder layers; Qwen2.5-VL 28), batch 1:

* a decode step: no extra sync and at most 2 extra ops, for every method;
* the prefill: no extra sync for a fixed-budget boundary method, at most one per pruning layer for an in-LLM method,
  one per adaptive decision; extra ops at most a third of what the same counter measured before these budgets
  (``BEFORE``: PyTorch kernels, per model). On Qwen-VL a boundary method reads the items' grids once (they
  live on the device; the dense model itself reads them dozens of times per prefill).
"""

from __future__ import annotations

import json

import pytest
import torch

import vtoken
from vtoken import cli
from vtoken.evals.bench.models import build_model, synthetic_inputs
from vtoken.evals.bench.overhead import OpCounter, count_methods

# one worker under pytest-xdist: the counts of every method on each 32-layer host (the `counted` fixture) take two
# minutes, and split over workers each would count them again
pytestmark = pytest.mark.xdist_group("overhead")

# extra prefill ops of each method at keep=64 before these budgets (dense: 2,607 / 2,631 / 2,684 ops)
BEFORE = {
    "count-llava-1.5": {"random": 93, "pool": 142, "divprune": 951, "tokenflex": 98, "todre": 1311, "attn_topk": 498,
                        "transprune": 1197, "corematching": 1191},
    "count-llava-next": {"random": 96, "pool": 202, "divprune": 976, "tokenflex": 97, "todre": 1317, "attn_topk": 498,
                         "transprune": 1197, "corematching": 1191},
    "count-qwen2.5-vl": {"random": 121, "pool": 170, "divprune": 979, "todre": 1284, "attn_topk": 457,
                         "transprune": 1162, "corematching": 1080},
}
# extra prefill ops of methods added after those budgets: what they cost when added, plus 10% (PyramidDrop, DART:
# +266 to +284; CDPruner with its greedy-MAP kernel: +85 to +100, since its kernels are built for all of a prefill's
# images at once, which costs one image 9 ops more and InternVL's seven tiles 201 fewer; VisionZip: +109 on LLaVA-1.5,
# +165 on LLaVA-NeXT, +187 on Qwen2.5-VL)
ADDED_OPS = {"pyramiddrop": 315, "dart": 300, "cdpruner": 110, "visionzip": 206}
# syncs a prefill may add: one per pruning layer or adaptive decision (CoreMatching: its FFN slices are one more);
# PyramidDrop, DART, CDPruner and VisionZip keep fixed budgets, so they add none
PREFILL_SYNCS = {"random": 0, "pool": 0, "divprune": 0, "tokenflex": 0, "todre": 1, "attn_topk": 1, "transprune": 3,
                 "corematching": 1, "corematching keep=None": 2, "pyramiddrop": 0, "dart": 0, "cdpruner": 0,
                 "visionzip": 0}
TRITON = {"backend": "triton"}
METHODS = {
    "random": ("random", dict(keep=64)), "pool": ("pool", dict(keep=64)),
    "divprune": ("divprune", dict(keep=64, **TRITON)), "tokenflex": ("tokenflex", dict(num_tokens=64)),
    "todre": ("todre", dict(keep=64, **TRITON)), "attn_topk": ("attn_topk", dict(keep=64, **TRITON)),
    "transprune": ("transprune", dict(keep=64, **TRITON)), "corematching": ("corematching", dict(keep=64, **TRITON)),
    "corematching keep=None": ("corematching", dict(keep=None, **TRITON)),
    "pyramiddrop": ("pyramiddrop", dict(keep=64, **TRITON)), "dart": ("dart", dict(keep=64, **TRITON)),
    "cdpruner": ("cdpruner", dict(keep=64, **TRITON)), "visionzip": ("visionzip", dict(keep=64)),
}
HOSTS = {"count-llava-1.5": list(METHODS), "count-llava-next": list(METHODS),
         "count-qwen2.5-vl": [m for m in METHODS if m not in ("tokenflex", "corematching", "corematching keep=None")]}


@pytest.fixture(scope="module", params=sorted(HOSTS))
def counted(request):
    model = build_model(request.param)
    methods = [(label, *METHODS[label]) for label in HOSTS[request.param]]
    return request.param, count_methods(model, synthetic_inputs(model), methods, new_tokens=3, progress=False)


def test_decode_steps_cost_what_dense_costs(counted):
    host, counts = counted
    dense = counts["dense"]
    for label, c in counts.items():
        assert c.decode_syncs == dense.decode_syncs, (host, label, c.decode_sites)
        assert c.decode_ops <= dense.decode_ops + 2, (host, label, c.decode_ops - dense.decode_ops)


def test_prefill_syncs_and_ops_stay_within_budget(counted):
    host, counts = counted
    dense = counts["dense"]
    for label, c in counts.items():
        if label == "dense":
            continue
        extra = c.prefill_syncs - dense.prefill_syncs
        grids = int(host == "count-qwen2.5-vl" and "boundary" in vtoken.methods()[METHODS[label][0]].stages)
        assert extra <= PREFILL_SYNCS[label] + grids, (host, label, c.prefill_sites)
        method = label.split()[0]
        limit = BEFORE[host][method] / 3 if method in BEFORE[host] else ADDED_OPS[method]
        assert c.prefill_ops - dense.prefill_ops <= limit, (host, label, c.prefill_ops - dense.prefill_ops)


def test_the_counter_sees_syncs_and_kernel_launches():
    model = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with OpCounter(model) as counter:
        y = model(x)
        y.sum().item()
        (y > 0).nonzero()
        y[y > 0]
        y.tolist()
        model(x)  # a second call: a second segment
    first, second = counter.segments
    assert first.syncs == 4 and first.ops >= 6 and second.syncs == 0
    assert sum(first.sites.values()) == 4


def test_a_graphed_part_is_one_launch_and_its_syncs_still_count():
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), inner)
    x = torch.randn(2, 4)
    with OpCounter(model) as whole:
        model(x)
    with OpCounter(inner) as inside:
        inner(x)
    inner.register_forward_hook(lambda module, args, out: out.sum().item())  # a read inside: it breaks a graph
    with OpCounter(model, graphed=(inner,)) as graphed:
        model(x)
    (plain,), (inner_only,), (replayed,) = whole.segments, inside.segments, graphed.segments
    assert replayed.ops == plain.ops - inner_only.ops + 1 and replayed.launches["graph replay"] == 1
    assert replayed.syncs == replayed.graph_syncs == 1 and plain.syncs == 0


def test_graphed_counts_keep_the_methods_extra_ops_and_drop_the_models_own():
    model = build_model("tiny-llava-1.5")
    inputs, methods = synthetic_inputs(model), [("random", "random", dict(keep=64))]
    eager = count_methods(model, inputs, methods, new_tokens=3, progress=False)
    graphed = count_methods(model, inputs, methods, new_tokens=3, progress=False, graphed=True)
    # the tower and the decoder are one launch each: a fifth of the host's launches or fewer, the same syncs
    assert graphed["dense"].prefill_ops * 5 < eager["dense"].prefill_ops
    assert graphed["dense"].decode_ops * 5 < eager["dense"].decode_ops
    assert graphed["dense"].prefill_syncs == eager["dense"].prefill_syncs
    assert graphed["dense"].graph_syncs == graphed["random"].graph_syncs == 0  # nothing inside breaks a graph
    # the selection runs between the two, eager either way
    extra = {name: c["random"].prefill_ops - c["dense"].prefill_ops for name, c in (("eager", eager),
                                                                                      ("graphed", graphed))}
    assert extra["graphed"] == extra["eager"] > 0


def test_a_prefill_pruned_inside_the_llm_reads_nothing_inside_the_graphed_decoder():
    """What would split the decoder's graph is a read of the device inside it: none for a count the budget fixes
    (attn_topk), nor for one that depends on the data (CoreMatching's threshold, ToDRE's stage 2 firing), whose
    dropped tokens are masked there; their decode steps are dense's, their masks inside the step's graph."""
    model = build_model("tiny-llava-1.5")
    methods = [("attn_topk", "attn_topk", dict(keep=64)), ("corematching", "corematching", dict(keep=None)),
               ("todre", "todre", dict(keep=64, tau=1.0))]
    graphed = count_methods(model, synthetic_inputs(model), methods, new_tokens=3, progress=False, graphed=True)
    for label in ("attn_topk", "corematching", "todre"):
        assert graphed[label].graph_syncs == 0, label
        shift = label == "todre"  # a boundary method's one op per step: the positions' shift
        assert graphed[label].decode_ops == graphed["dense"].decode_ops + shift, label
    eager = count_methods(model, synthetic_inputs(model), methods[1:], new_tokens=3, progress=False, static=True)
    for label in ("corematching", "todre"):  # eager, the decision reads its count once
        reads = {site: n for site, n in eager[label].prefill_sites.items() if site.endswith(" _score")}
        assert list(reads.values()) == [1] and not any(s.endswith(" _score") for s in graphed[label].prefill_sites)


def test_the_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert cli.main(["overhead", "--model", "tiny-llava-1.5", "--method", "random", "--method", "attn_topk:layer=2",
                     "--new-tokens", "2", "--json", str(out), "--quiet", "--sites"]) == 0
    printed = capsys.readouterr().out
    assert "syncs / decode step" in printed and "attn_topk layer=2" in printed
    report = json.loads(out.read_text())
    assert set(report["counts"]) == {"dense", "random", "attn_topk layer=2"} and report["kernels"] == "triton"
    assert report["counts"]["random"]["decode_syncs"] == report["counts"]["dense"]["decode_syncs"]
    assert cli.main(["overhead", "--model", "tiny-llava-1.5", "--method", "attn_topk:layer=2", "--cache", "static",
                     "--new-tokens", "2", "--json", str(out), "--quiet"]) == 0
    assert "static cache;" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["cache"] == "static" and set(report["counts"]) == {"dense", "attn_topk layer=2"}


def test_a_method_the_model_cannot_take_is_refused_before_counting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["overhead", "--model", "tiny-llava-1.5", "--method", "svg2"])
    assert exit_info.value.code == 2
    assert "svg2" in capsys.readouterr().err
    assert "overhead" in vtoken.cli.COMMANDS


@pytest.mark.parametrize("host", ["llava", "llava_next", "internvl", "qwen2_5_vl"])
def test_a_padded_batchs_decode_step_stays_within_budget(host):
    """A left-padded batch (LLaVA: rows keep as many tokens; the others: rows keep different numbers, so the shorter
    ones hold filler slots). generate()'s padding mask is moved onto the cache's slots before each step: a slice (a
    view, no launch) and one concatenation, plus the positions' shift; on a static cache generate() builds its 4-D
    masks from it. The prefill's 4-D mask (static) is remapped without reading the device."""
    from test_llava_invariants import Host
    from test_qwen_vl import QwenHost

    tiny = QwenHost(host) if host.startswith("qwen") else Host(host)
    methods = [("random", "random", dict(keep=0.25))]
    # 4 tokens: dense's first decode step is one op lighter than its later ones, which the budget compares with
    dynamic = count_methods(tiny.model, tiny.batch(), methods, new_tokens=4, progress=False)
    static = count_methods(tiny.model, tiny.batch(), methods, new_tokens=4, progress=False, graphed=True)
    for counts in (dynamic, static):
        dense, pruned = counts["dense"], counts["random"]
        # nothing added inside the tower or the decoder (Qwen's own tower reads its grids there, dense alike)
        assert pruned.decode_syncs == dense.decode_syncs, pruned.decode_sites
        assert pruned.graph_syncs == dense.graph_syncs
        assert pruned.decode_ops <= dense.decode_ops + 3, pruned.decode_ops - dense.decode_ops
    assert (static["random"].prefill_syncs - static["dense"].prefill_syncs
            == dynamic["random"].prefill_syncs - dynamic["dense"].prefill_syncs), static["random"].prefill_sites


def test_a_static_decode_step_after_in_llm_pruning_stays_within_budget():
    """On a static cache a pruned layer's mask spans every slot, so it is moved in every decode step (one distinct
    record, one mask): a gather and a fill from a map the prefill made, no read of the device."""
    model = build_model("count-llava-1.5")
    methods = {label: METHODS[label] for label in ("attn_topk", "transprune", "corematching", "pyramiddrop", "dart")}
    methods["todre"] = ("todre", dict(keep=64, tau=1.0, **TRITON))  # its stage 2 fires (at keep=64 it need not)
    records = {"transprune": 3, "pyramiddrop": 3}  # distinct pruned records (stages); the others prune once
    counts = count_methods(model, synthetic_inputs(model), [(label, *m) for label, m in methods.items()],
                           new_tokens=3, progress=False, static=True)
    dense = counts["dense"]
    for label in methods:
        c = counts[label]
        assert c.decode_syncs == dense.decode_syncs, (label, c.decode_sites)
        boundary = int(label == "todre")  # its boundary stage's shifted positions, as on a dynamic cache
        budget = 2 * records.get(label, 1) + boundary
        assert c.decode_ops <= dense.decode_ops + budget, (label, c.decode_ops - dense.decode_ops)
        assert c.prefill_syncs - dense.prefill_syncs <= PREFILL_SYNCS[label], (label, c.prefill_sites)
