"""Decode-time FFN sparsity: a gated MLP that computes only the neurons a method chose for each row at prefill.

The chosen rows of ``gate`` / ``up`` and columns of ``down`` are copied once, contiguously (gate and up stacked into
one matrix), so a decode step is two matrix products over the chosen neurons instead of three over all ``m``, with no
per-step gather. The model's own weights are never modified: the copies live here and are dropped with the patch.
Only single-token steps on a cache (``generate()``'s decode) take the sparse path; anything longer (a prefill, a
follow-up turn's prompt) runs the original MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtoken.adapters import _compat


class SlicedFFN:
    """``mlp`` restricted to ``neurons`` (B, k), one neuron set per row; a row of -1 (a prompt without visual tokens)
    runs the whole MLP, exactly as it would alone.

    The weights of the union of the sparse rows' sets are copied once; a row's other neurons in the union are
    multiplied by zero before the down projection, which gives that row's restricted FFN. A batch step therefore reads
    each needed weight once (never more than the dense FFN), and rows with one set (beams of one prompt) need no mask.
    Which rows are dense is read once here, when the slices are made, never in a decode step.
    """

    def __init__(self, mlp: _compat.GatedMLP, neurons: torch.Tensor, original=None):
        self.act = mlp.act
        self.original = original or mlp.module.forward  # the unshadowed forward (DecodeFFN shadows the module's)
        gate, up, down = mlp.gate.weight, mlp.up.weight, mlp.down.weight
        neurons = neurons.to(gate.device)
        self.rows = neurons.shape[0]
        dense = (neurons < 0).all(1)
        # one host read per prefill (the rows' kinds decide which path each decode step takes)
        dense_rows = dense.nonzero().squeeze(1)
        self.dense_rows = dense_rows if 0 < dense_rows.numel() < self.rows else None
        self.sparse_rows = (~dense).nonzero().squeeze(1) if self.dense_rows is not None else None
        self.all_dense = dense_rows.numel() == self.rows
        if self.all_dense:
            return
        neurons = neurons[~dense]
        union = neurons.unique(sorted=True)
        self.gate_up = torch.cat([gate.index_select(0, union), up.index_select(0, union)])  # (2u, d)
        self.down = down.index_select(1, union)  # (d, u)
        self.gate_up_bias = None if mlp.gate.bias is None else torch.cat([mlp.gate.bias[union], mlp.up.bias[union]])
        self.down_bias = mlp.down.bias
        member = torch.zeros(neurons.shape[0], gate.shape[0], dtype=torch.bool, device=gate.device)
        member = member.scatter_(1, neurons, True)[:, union]  # (sparse rows, u)
        self.mask = None if bool(member.all()) else member.to(gate.dtype).unsqueeze(1)  # (sparse rows, 1, u)

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
        """Slice the weights for ``neurons`` (B, len(indices), k), unless the current slices were made from them."""
        if self.source is neurons or (self.source is not None and self.source.shape == neurons.shape
                                      and torch.equal(self.source, neurons)):
            return
        self.sliced = {}  # free the old copies before making new ones
        self.sliced = {i: SlicedFFN(self.mlps[i], neurons[:, j], self.originals[i]) for j, i in enumerate(self.indices)}
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
