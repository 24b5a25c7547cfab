"""Decode-time FFN sparsity: a gated MLP that computes only the neurons a method chose for each row at prefill.

The chosen rows of ``gate`` / ``up`` and columns of ``down`` are copied once, contiguously (gate and up stacked into
one matrix), so a decode step is two matrix products over the chosen neurons instead of three over all ``m``, with no
per-step gather. The model's own weights are never modified: the copies live here and are dropped with the patch.
Only single-token steps on a cache (``generate()``'s decode) take the sparse path; anything longer (a prefill, a
follow-up turn's prompt) runs the original MLP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from vtoken.adapters import _compat


class SlicePlan(NamedTuple):
    """What slicing one layer needs, known on the host: the union of the sparse rows' neurons and which rows run
    dense (made for every layer at once by :func:`plan_slices`, with one read of the device)."""

    union: torch.Tensor  # (u,) sorted neuron indices
    same_sets: bool  # every sparse row has the union as its set (beams of one prompt): no mask
    dense_rows: torch.Tensor | None  # indices of rows without a set (-1), None when there are none
    sparse_rows: torch.Tensor | None  # the other rows' indices, None when every row is sparse
    all_dense: bool


def plan_slices(neurons: torch.Tensor, m: int) -> list[SlicePlan]:
    """One :class:`SlicePlan` per layer of ``neurons`` (B, layers, k), for FFNs of ``m`` neurons. The sizes of every
    union and which rows are dense are read from the device together, once."""
    B, layers, k = neurons.shape
    dense = (neurons < 0).all(-1).all(-1)  # (B,) a row is dense in every layer or in none
    member = torch.zeros(B, layers, m, dtype=torch.bool, device=neurons.device)
    member.scatter_(2, neurons.clamp(min=0), (neurons >= 0))
    union = (member & ~dense[:, None, None]).any(0)  # (layers, m)
    *sizes, n_dense = torch.cat([union.sum(-1), dense.sum().unsqueeze(0)]).tolist()  # the one read
    if n_dense == B:
        return [SlicePlan(union[0, :0].long(), True, None, None, True)] * layers
    dense_rows = torch.nonzero_static(dense, size=n_dense).squeeze(1) if n_dense else None
    sparse_rows = torch.nonzero_static(~dense, size=B - n_dense).squeeze(1) if n_dense else None
    # every layer's union at once: flat indices, split by the sizes just read, then made per layer
    flat = torch.nonzero_static(union.flatten(), size=sum(sizes)).squeeze(1)
    unions = (flat % m).split(sizes)
    return [SlicePlan(u, size == k, dense_rows, sparse_rows, False) for u, size in zip(unions, sizes)]


class SlicedFFN:
    """``mlp`` restricted to ``neurons`` (B, k), one neuron set per row; a row of -1 (a prompt without visual tokens)
    runs the whole MLP, exactly as it would alone.

    The weights of the union of the sparse rows' sets are copied once; a row's other neurons in the union are
    multiplied by zero before the down projection, which gives that row's restricted FFN. A batch step therefore reads
    each needed weight once (never more than the dense FFN), and rows with one set (beams of one prompt) need no mask.
    Which rows are dense, and the union's size, come from a :class:`SlicePlan` (read once per prefill for every layer);
    a decode step reads nothing.
    """

    def __init__(self, mlp: _compat.GatedMLP, neurons: torch.Tensor, original=None, plan: SlicePlan | None = None):
        self.act = mlp.act
        self.original = original or mlp.module.forward  # the unshadowed forward (DecodeFFN shadows the module's)
        gate, up, down = mlp.gate.weight, mlp.up.weight, mlp.down.weight
        neurons = neurons.to(gate.device)
        plan = plan or plan_slices(neurons.unsqueeze(1), gate.shape[0])[0]
        self.rows, self.all_dense = neurons.shape[0], plan.all_dense
        self.dense_rows, self.sparse_rows = plan.dense_rows, plan.sparse_rows
        if self.all_dense:
            return
        union = plan.union
        self.gate_up = torch.cat([gate.index_select(0, union), up.index_select(0, union)])  # (2u, d)
        self.down = down.index_select(1, union)  # (d, u)
        self.gate_up_bias = None if mlp.gate.bias is None else torch.cat([mlp.gate.bias[union], mlp.up.bias[union]])
        self.down_bias = mlp.down.bias
        self.mask = None
        if not plan.same_sets:
            if self.sparse_rows is not None:
                neurons = neurons.index_select(0, self.sparse_rows)
            member = torch.zeros(neurons.shape[0], gate.shape[0], dtype=torch.bool, device=gate.device)
            member = member.scatter_(1, neurons, True).index_select(1, union)  # (sparse rows, u)
            self.mask = member.to(gate.dtype).unsqueeze(1)  # (sparse rows, 1, u)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.rows:
            raise RuntimeError(f"vtoken: a decode step with {x.shape[0]} rows runs FFN neurons chosen for {self.rows}")
        if self.all_dense:
            return self.original(x)
        if self.dense_rows is None:
            return self.sparse(x)
        out = torch.empty_like(x)
        out.index_copy_(0, self.sparse_rows, self.sparse(x.index_select(0, self.sparse_rows)))
        return out.index_copy_(0, self.dense_rows, self.original(x.index_select(0, self.dense_rows)))

    def sparse(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up, self.gate_up_bias).chunk(2, dim=-1)
        hidden = self.act(gate) * up
        if self.mask is not None:
            hidden = hidden * self.mask
        return F.linear(hidden, self.down, self.down_bias)


class DecodeFFN:
    """Shadows ``forward`` of the MLPs of ``indices`` (on the instance, recorded on ``handle``) so that single-token
    steps run a :class:`SlicedFFN` while one is active; everything else runs the original forward."""

    def __init__(self, layers, indices: tuple[int, ...], handle, method: str):
        self.indices = tuple(indices)
        self.mlps, self.originals = {}, {}
        for i in self.indices:
            mlp = _compat.gated_mlp(layers[i])
            if mlp is None:
                raise ValueError(f"{method}: decoder layer {i}'s MLP ({type(layers[i].mlp).__name__}) is not a gated "
                                 "(gate_proj / up_proj / down_proj) MLP, so its neurons cannot be sliced; choose "
                                 "layers with a gated MLP or turn decode sparsity off")
            self.mlps[i] = mlp
            self.originals[i] = mlp.module.forward
            handle.set_attr(mlp.module, "forward", self._forward(i, mlp.module.forward))
        self.source: torch.Tensor | None = None  # (B, len(indices), k) the neurons the slices were made from
        self.sliced: dict[int, SlicedFFN] = {}
        self.active = False

    def prepare(self, neurons: torch.Tensor) -> None:
        """Slice the weights for ``neurons`` (B, len(indices), k), unless the current slices were made from these very
        tensors (a conversation carries its own: comparing values would read the device every step)."""
        if self.source is neurons:
            return
        self.sliced = {}  # free the old copies before making new ones
        plans = plan_slices(neurons, self.mlps[self.indices[0]].gate.weight.shape[0])
        self.sliced = {i: SlicedFFN(self.mlps[i], neurons[:, j], self.originals[i], plans[j])
                       for j, i in enumerate(self.indices)}
        self.source = neurons

    def activate(self, neurons: torch.Tensor | None) -> None:
        """Single-token steps of the coming call run the slices of ``neurons`` (None: the dense MLPs)."""
        if neurons is not None:
            self.prepare(neurons)
        self.active = neurons is not None

    def _forward(self, index: int, original):
        def forward(x, *args, **kwargs):
            if self.active and x.shape[1] == 1 and not args and not kwargs:
                return self.sliced[index](x)
            return original(x, *args, **kwargs)

        return forward
