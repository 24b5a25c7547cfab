"""Hugging Face Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen*VLForConditionalGeneration``), images and videos.

The hooks are the shared :class:`~vtoken.adapters.vlm.host.VLMPatch`; this file says where Qwen keeps things:

* two modalities, images (``get_image_features``) and videos (``get_video_features``), each item a merged
  (t, h/m, w/m) grid of tokens, one grid per frame (t = 1 for an image; m = the 2x2 patch merger's side);
* M-RoPE: every token keeps its original (t, h, w) position, so the full position ids are computed from the
  unshortened prompt first (the model's own ``get_rope_index``) and then gathered for the kept tokens; the text row
  generate() prepends (used for masks) follows the shorter prompt; decode steps continue from the model's rope deltas;
* ``mm_token_type_ids`` (which tokens are image / video) follows the prompt's columns;
* Qwen3-VL's deepstack features (added to the first decoder layers at the visual tokens) are reduced with their
  tokens, and while an in-LLM method prunes, vtoken adds them itself at the tokens still alive.

Qwen's encoder has no [CLS] token, so ToDRE's pivot is a seeded random token (the paper's ablation: <= 0.2 points), and
the tower's attention on a token (VisionZip's ranking) is what it receives in the last block (``QwenTowerReader``).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from vtoken.adapters import _compat
from vtoken.adapters.vlm.cache import CacheLayout
from vtoken.adapters.vlm.columns import PromptEdit, gather_rows
from vtoken.adapters.vlm.host import Modality, VLMPatch, gather_positions, renumbered_positions
from vtoken.adapters.vlm.tower import merge_patches, rotate_half, segment_received, tower_tokens
from vtoken.methods.base import GridSegment, ImageContext, TowerTokens
from vtoken.registry import register_host


def _is_qwen_vl(model) -> bool:
    return isinstance(model, _compat.qwen_vl_classes())


def grid_context(thw: list[int], merge: int, video: bool) -> ImageContext:
    """An item's token layout: one merged grid per frame, frames in order (``thw`` on the host)."""
    t, h, w = thw
    rows, cols = h // merge, w // merge
    per_frame = rows * cols
    segments = [GridSegment(f * per_frame, rows, cols) for f in range(t)]
    frames = torch.arange(t).repeat_interleave(per_frame) if video else None
    return ImageContext(n=t * per_frame, segments=segments, modality="video" if video else "image", frames=frames)


class QwenVLPatch(VLMPatch):
    """vtoken's hooks on one Qwen2-VL / Qwen2.5-VL / Qwen3-VL instance (see the module docstring)."""

    host = "qwen_vl"
    token_kwargs = ("mm_token_type_ids",)

    def __init__(self, model):
        super().__init__(model)
        self.merge = self.config.vision_config.spatial_merge_size
        self.deepstack = "deepstack_visual_embeds" in inspect.signature(self.llm.forward).parameters

    def modalities(self) -> list[Modality]:
        return [Modality("image", "get_image_features", "pixel_values", self.config.image_token_id),
                Modality("video", "get_video_features", "pixel_values_videos", self.config.video_token_id)]

    def encoder_call(self, modality: Modality, kwargs: dict) -> dict:
        grid = f"{modality.name}_grid_thw"
        return {modality.pixels: kwargs[modality.pixels], grid: kwargs.get(grid), "return_dict": True}

    def encode(self, modality: Modality, original, call: dict):
        reader = QwenTowerReader(self.tower, self.merge)
        out = reader.capture(original, call)
        grids = call.get(f"{modality.name}_grid_thw")
        if grids is None:
            raise ValueError(f"vtoken: {modality.features} needs {modality.name}_grid_thw to lay out the tokens")
        # one read of the grids (the model reads them too): every layout below is host arithmetic
        contexts = [grid_context(thw, self.merge, modality.name == "video") for thw in grids.tolist()]
        first = 0
        for context in contexts:
            context.tower = functools.cache(functools.partial(reader.item_tokens, first, context.n))
            first += context.n
        return out, contexts

    def companions(self, out) -> list[list[torch.Tensor]]:
        layers = getattr(out, "deepstack_features", None)
        if not layers:
            return []
        return [list(per_item) for per_item in zip(*layers)]

    def set_companions(self, out, companions: list[list[torch.Tensor]]) -> None:
        out.deepstack_features = [list(per_layer) for per_layer in zip(*companions)]

    # -- positions -------------------------------------------------------------------------------------------------
    def complete_positions(self, module, kwargs: dict, layout: CacheLayout | None) -> None:
        """The M-RoPE positions of the whole, unshortened call, as the model would compute them."""
        if kwargs.get("position_ids") is not None:
            return
        if layout is not None or kwargs.get("input_ids") is None:
            raise ValueError(
                "vtoken: images or videos that continue a KV cache, or come as inputs_embeds, need position_ids on "
                "Qwen-VL (generate() passes them); compute them with the model's get_rope_index on the full prompt"
            )
        mask = kwargs.get("attention_mask")
        extra = {k: kwargs[k] for k in ("second_per_grid_ts",) if kwargs.get(k) is not None}
        positions, deltas = module.get_rope_index(
            kwargs["input_ids"], mm_token_type_ids=kwargs.get("mm_token_type_ids"),
            image_grid_thw=kwargs.get("image_grid_thw"), video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=mask if mask is not None and mask.dim() == 2 else None, **extra)
        module.rope_deltas = deltas  # what the model's own forward records for later decode steps
        kwargs["position_ids"] = positions

    def record(self, layout: CacheLayout) -> None:
        if self.base.rope_deltas is not None:
            layout.rope_deltas = per_row(self.base.rope_deltas.clone(), layout.batch)
            layout.deltas_source = self.base.rope_deltas
            if layout.renumbered:  # decode steps move generate()'s text row (row 0 of [text, t, h, w]) by the shift
                layout.__dict__["_text_row_shift"] = F.pad(layout.shift_column()[None], (0, 0, 0, 0, 0, 3))  # (4, B, 1)

    def text_positions(self, kwargs: dict, layout: CacheLayout, length_in: int):
        """Text on a shortened cache. When generate() derived [text, t, h, w] from the caller's columns and the rope
        deltas this prefill recorded (the model still holds them), the M-RoPE rows are already the original
        positions and only the text row (the cache's slot) moves down by the shift: one op, or none after in-LLM
        pruning alone. Otherwise (other callers, other releases) the positions are rebuilt."""
        positions = kwargs.get("position_ids")
        if (positions is not None and positions.dim() == 3 and positions.shape[0] == 4
                and layout.deltas_source is not None and self.base.rope_deltas is layout.deltas_source):
            return positions - layout.__dict__["_text_row_shift"] if layout.renumbered else positions
        return self.map_positions(kwargs, layout, None, length_in)  # original positions, not renumbered ones

    def map_positions(self, kwargs: dict, layout: CacheLayout | None, edit: PromptEdit | None, length_in: int):
        positions = kwargs.get("position_ids")
        if layout is not None and edit is None:
            # Text on a shortened cache. generate() looks for new images from the cache's slot count, which is short,
            # so it finds the old ones, recomputes positions without them and zeroes the model's rope deltas: rebuild
            # them from the text positions and the deltas the prefill recorded.
            if positions is None:
                positions = self.continued_positions(kwargs, layout, length_in)[1:]  # (t, h, w), as the model would
            elif positions.dim() == 3 and positions.shape[0] == 4:
                positions = self.continued_positions(kwargs, layout, length_in, positions[0])
        if positions.dim() == 2:  # plain text positions
            return renumbered_positions(positions, layout, edit, length_in)
        text = None
        if positions.shape[0] == 4:  # generate()'s [text, t, h, w]: the text row follows the shorter prompt
            text, positions = positions[0], positions[1:]
            text = renumbered_positions(text, layout, edit, length_in)
            if text is None:
                B = edit.col_map.shape[0]
                text = torch.arange(edit.length_out, device=edit.col_map.device).expand(B, -1)
        if edit is not None:
            positions = gather_positions(positions, edit)
        return positions if text is None else torch.cat([text.unsqueeze(0).to(positions.dtype), positions], 0)

    def continued_positions(self, kwargs: dict, layout: CacheLayout, length_in: int,
                            text: torch.Tensor | None = None) -> torch.Tensor:
        """(4, B, q) [text, t, h, w] positions of new text tokens on a cache, as the unpatched model derives them:
        the caller's text position (its column, padding skipped) plus the rope delta the prefill recorded."""
        if text is None:
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -length_in:]
            else:
                device = layout.source.device
                text = layout.columns + torch.arange(length_in, device=device).expand(layout.batch, -1)
        deltas = layout.rope_deltas if layout.rope_deltas is not None else self.base.rope_deltas
        if deltas is not None:
            deltas = per_row(deltas, text.shape[0])
        rope = text if deltas is None else text + deltas.to(text.device)
        if deltas is not None:
            self.base.rope_deltas = deltas  # undo generate()'s reset, for callers that read it next
        return torch.cat([text.unsqueeze(0), rope.unsqueeze(0).expand(3, -1, -1)], 0)

    # -- Qwen3-VL deepstack under in-LLM pruning --------------------------------------------------------------------
    def attach_method(self, method, handle) -> None:
        super().attach_method(method, handle)
        if self.decoder is not None and self.deepstack:
            DeepstackInjector(self, handle)


class QwenTowerReader:
    """The attention each merged token receives in the tower's last block (whose output the merger reads): averaged
    over heads and over the queries of its frame (or window, in a windowed block), summed over the token's merged
    patches; keys (before RoPE) averaged over heads and patches. Captured during one encoder call: the block's input
    and keyword arguments, and Qwen2.5-VL's window order (the tower reverts it on the merged tokens, and so does this).
    """

    source = "received"

    def __init__(self, tower, merge: int):
        self.tower, self.unit = tower, merge * merge
        self.block = tower.blocks[-1]
        self.call: tuple | None = None
        self.window: torch.Tensor | None = None
        self.maps: torch.Tensor | None = None

    def grab(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.call = (x, kwargs["cu_seqlens"], kwargs["position_embeddings"])

    def capture(self, original, call: dict):
        """``original(**call)`` with the last block's input and the window order captured."""
        hook = self.block.register_forward_pre_hook(self.grab, with_kwargs=True)
        name = _compat.QWEN_WINDOW_PERMUTE
        permute, own = getattr(self.tower, name, None), vars(self.tower).get(name)
        if permute is not None:
            def recording(x, window_index, *args, **kwargs):
                if self.window is None:
                    self.window = window_index
                return permute(x, window_index, *args, **kwargs)

            setattr(self.tower, name, recording)  # this instance, this call only
        try:
            return original(**call)
        finally:
            hook.remove()
            if permute is not None:
                if own is None:
                    delattr(self.tower, name)
                else:
                    setattr(self.tower, name, own)

    def merged_order(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-merged-token rows in the tower's order -> in the features' order (Qwen2.5-VL's windows undone)."""
        return rows if self.window is None else rows[torch.argsort(self.window)]

    def token_maps(self) -> torch.Tensor | None:
        """(merged tokens of the call, 1 + d) the attention and keys of every merged token, in the features' order."""
        if self.maps is None and self.call is not None:
            x, cu_seqlens, (cos, sin) = self.call
            attn = _compat.qwen_vision_attention(self.block)
            S = x.shape[0]
            q, k, _ = attn.qkv(attn.norm(x)).reshape(S, 3, attn.num_heads, -1).unbind(1)
            keys = k.float().mean(dim=1)
            cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
            q, k = (t.float() * cos + rotate_half(t.float()) * sin for t in (q, k))
            patches = torch.cat([segment_received(q, k, attn.scale, cu_seqlens).unsqueeze(-1), keys], dim=-1)
            merged = merge_patches(patches.view(S // self.unit, self.unit, -1), 1)
            self.maps, self.call = self.merged_order(merged), None
        return self.maps

    def item_tokens(self, first: int, n: int) -> TowerTokens | None:
        maps = self.token_maps()
        return None if maps is None else tower_tokens(maps[first:first + n], self.source)


def per_row(deltas: torch.Tensor, batch: int) -> torch.Tensor:
    """The (rows, 1) rope deltas for ``batch`` rows: generate() computes them per prompt, then repeats every prompt
    for its beams and returned sequences (each row ``batch // rows`` times in a row, as ``repeat_interleave``)."""
    if deltas.shape[0] == batch:
        return deltas
    if deltas.shape[0] == 0 or batch % deltas.shape[0]:
        raise ValueError(f"vtoken: the model's rope deltas cover {deltas.shape[0]} rows, the call has {batch}")
    return deltas.repeat_interleave(batch // deltas.shape[0], dim=0)


class DeepstackInjector:
    """While a prefill is pruned inside the LLM, Qwen3-VL's own loop would add each deepstack layer's features at the
    LLM input's visual positions, which no longer line up once tokens are gone. The features are taken out of the
    text model's call and added after each of the first decoder layers at the visual tokens still alive there."""

    def __init__(self, patch: QwenVLPatch, handle):
        self.patch = patch
        self.pending: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        handle.forward_pre_hook(patch.llm, self.take, with_kwargs=True)
        for i, layer in enumerate(patch.llm.layers):
            handle.forward_hook(layer, self.make_add(i))

    def take(self, module, args, kwargs):
        self.pending = None
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is None or self.patch.decoder.mode != "prefill":
            return None
        self.pending = (kwargs["visual_pos_masks"], embeds)
        return args, {**kwargs, "deepstack_visual_embeds": None, "visual_pos_masks": None}

    def make_add(self, index: int):
        def add(module, args, output):
            if self.pending is None or index >= len(self.pending[1]):
                return None
            masks, embeds = self.pending
            hidden = output[0] if isinstance(output, tuple) else output
            state = self.patch.decoder.state
            rank = (masks.flatten().long().cumsum(0) - 1).view_as(masks)  # row of each visual token in `embeds`
            if state is not None and state.alive is not None:
                masks = gather_rows(masks, state.alive) & state.live
                rank = gather_rows(rank, state.alive)
            hidden = hidden.clone()
            hidden[masks] = hidden[masks] + embeds[index][rank[masks]].to(hidden.device, hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return add


register_host("qwen_vl", "transformers Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration / "
              "Qwen3VLForConditionalGeneration (images and videos)", matches=_is_qwen_vl,
              installers={"boundary": QwenVLPatch.install, "in_llm": QwenVLPatch.install,
                          "tower_attention": QwenVLPatch.install})
