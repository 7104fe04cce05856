"""Logit effects of SAE latents: each decoder direction through the model's unembedding.

As SAE-Vis / SAEDashboard and Neuronpedia show them, per latent: the tokens whose logits its
decoder direction raises and lowers most along the direct path (the direction added to the
residual stream, through the final norm's scale and the unembedding, ignoring every later layer and
the norm's division by the residual's size), and a histogram of its effect on every token.

    effect = (center(d) * scale) @ W_U       d: the decoder row, in the residual stream's basis
                                              center: minus its mean where the final norm is a LayerNorm
                                              scale: the final norm's weight (none when folded into W_U)

The decoder row is in the residual stream's basis when the hook is the residual stream or a write
into it (attention or MLP output): exact direct path. Attention `hook_z` rows go through W_O and
MLP `hook_post` rows through W_out first (TransformerLens), also exact. Any other hook of the
residual stream's width is not in that basis: its table is labelled an approximation. A
transcoder's decoder writes its output hook, so that hook decides.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from cache_writer.model_adapter import HEAD_SUFFIX, ModelAdapter
from analysis.svg import svg_bars

TOP_K = 10
"""Tokens shown per side."""

EXACT, APPROXIMATE, NONE = "exact", "approximation", "none"


@dataclass
class Unembedding:
    """What maps a residual-stream direction to logits along the direct path."""

    W_U: torch.Tensor
    """(d_model, d_vocab), on the model's device, in its dtype."""
    scale: torch.Tensor | None
    """(d_model,) the final norm's weight, or None (no norm, or folded into W_U)."""
    center: bool
    """The final norm subtracts the mean (LayerNorm), so a direction's mean does not reach the logits."""
    norm: str
    """The final norm, in words."""


@dataclass
class DirectPath:
    """How a hook's rows reach the residual stream."""

    kind: str
    """EXACT, APPROXIMATE or NONE (no logit effects)."""
    note: str
    """Said on the page."""
    to_residual: Callable[[torch.Tensor], torch.Tensor] | None = None
    """(n, d_hook) -> (n, d_model); None: the rows are used as they are."""


def unembedding(adapter: ModelAdapter) -> Unembedding:
    """The unembedding and final norm of a TransformerLens or Hugging Face model."""
    model = adapter.model
    if adapter.kind == "transformer_lens":
        ln = getattr(model, "ln_final", None)
        kind = model.cfg.normalization_type
        scale = getattr(ln, "w", None)
        return Unembedding(model.W_U, scale.detach() if scale is not None else None, kind in ("LN", "LNPre"),
                           f"ln_final ({kind}{', weight folded into W_U' if kind in ('LNPre', 'RMSPre') else ''})"
                           if ln is not None else "none")
    W_U = model.get_output_embeddings().weight.T  # (d_model, V) view
    name, norm = final_norm(model)
    if norm is None:
        return Unembedding(W_U, None, False, "none found")
    weight = getattr(norm, "weight", None)
    if weight is not None and "gemma" in type(norm).__name__.lower():
        weight = 1 + weight  # Gemma's RMSNorm scales by (1 + weight)
    return Unembedding(W_U, weight.detach() if weight is not None else None,
                       isinstance(norm, torch.nn.LayerNorm) or type(norm).__name__ == "LayerNorm",
                       f"{name} ({type(norm).__name__})")


def final_norm(model: torch.nn.Module) -> tuple[str, torch.nn.Module | None]:
    """A Hugging Face model's final norm: the last norm module outside the layer list (ln_f, norm,
    final_layer_norm, ...): its path has no numeric part."""
    found: tuple[str, torch.nn.Module | None] = ("", None)
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and not any(p.isdigit() for p in name.split(".")):
            found = (name, module)
    return found


def _layer_path(name: str) -> tuple[str, str] | None:
    """(path up to and including the layer index, the rest) of a module inside a layer list."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return (".".join(parts[:idx[-1] + 1]), ".".join(parts[idx[-1] + 1:])) if idx else None


def direct_path(adapter: ModelAdapter, hook: str, width: int, d_model: int) -> DirectPath:
    """How rows of `hook` (width `width`) reach a residual stream of width `d_model`."""
    if adapter.kind == "transformer_lens":
        path = _tl_path(adapter.model, hook)
        if path is not None:
            return path
    else:
        where = _layer_path(hook)
        if where and where[1] == "":
            return DirectPath(EXACT, f"{hook} is a layer's output: the residual stream")
        if where and where[1] in ("mlp", "attn", "self_attn", "attention", "feed_forward", "block_sparse_moe"):
            return DirectPath(EXACT, f"{hook} writes into the residual stream (added to it)")
    if width != d_model:
        return DirectPath(NONE, f"{hook} has width {width}, not the residual stream's {d_model}: no logit effects")
    return DirectPath(APPROXIMATE, f"{hook} is not the residual stream nor a write into it: its decoder directions "
                                   "taken as residual directions (an approximation)")


def _tl_path(model: Any, hook: str) -> DirectPath | None:
    """TransformerLens hooks whose rows reach the residual stream by a known linear map (or as they are)."""
    m = HEAD_SUFFIX.match(hook)
    base, head = (m["base"], int(m["head"])) if m else (hook, None)
    if re.fullmatch(r"blocks\.\d+\.hook_resid_(pre|mid|post)", base):
        return DirectPath(EXACT, f"{hook} is the residual stream")
    if re.fullmatch(r"blocks\.\d+\.hook_(attn|mlp)_out|hook_embed|hook_pos_embed", base):
        return DirectPath(EXACT, f"{hook} writes into the residual stream (added to it)")
    layer = re.match(r"blocks\.(\d+)\.", base)
    if layer is None:
        return None
    block = model.blocks[int(layer[1])]
    if base.endswith("attn.hook_z"):
        W_O = block.attn.W_O.detach()  # (heads, d_head, d_model)
        if head is not None:
            return DirectPath(EXACT, f"{hook} through W_O of head {head}", lambda d: d @ W_O[head].to(d.dtype))
        return DirectPath(EXACT, f"{hook} through W_O (every head)", lambda d: torch.einsum(
            "nhe,hem->nm", d.view(len(d), *W_O.shape[:2]), W_O.to(d.dtype)))
    if base.endswith("attn.hook_result"):
        if head is not None:
            return DirectPath(EXACT, f"{hook} is head {head}'s write into the residual stream")
        return DirectPath(EXACT, f"{hook}: the heads' writes into the residual stream, summed",
                          lambda d: d.view(len(d), -1, model.cfg.d_model).sum(1))
    if base.endswith("mlp.hook_post"):
        W_out = block.mlp.W_out.detach()  # (d_mlp, d_model)
        return DirectPath(EXACT, f"{hook} through the MLP's W_out", lambda d: d @ W_out.to(d.dtype))
    return None


@dataclass
class LogitEffects:
    """The effect of each direction on every token's logit."""

    values: torch.Tensor | None
    """(n, d_vocab) float32 on the CPU; None when the hook has no direct path."""
    exact: bool
    """False: an approximation (the hook is not in the residual stream's basis)."""
    note: str
    """How they were computed, in words."""


@torch.no_grad()
def logit_effects(adapter: ModelAdapter, hook: str, directions: torch.Tensor, vocab_chunk: int = 32768) -> LogitEffects:
    """Logit effects (n, d_vocab) of decoder directions (n, d) written at `hook` (see the module docstring)."""
    un = unembedding(adapter)
    d_model = un.W_U.shape[0]
    path = direct_path(adapter, hook, directions.shape[1], d_model)
    if path.kind == NONE:
        return LogitEffects(None, False, path.note)
    d = directions.to(device=un.W_U.device, dtype=torch.float32)
    if path.to_residual is not None:
        d = path.to_residual(d)
    if un.center:
        d = d - d.mean(-1, keepdim=True)
    if un.scale is not None:
        d = d * un.scale.to(d.dtype)
    values = torch.cat([(d @ un.W_U[:, a:a + vocab_chunk].float()).cpu()
                        for a in range(0, un.W_U.shape[1], vocab_chunk)], dim=1)
    how = f"decoder direction{' centred,' if un.center else ''} times {un.norm}'s scale, through the unembedding" \
        if un.scale is not None else f"decoder direction through the unembedding (final norm: {un.norm})"
    return LogitEffects(values, path.kind == EXACT, f"{how}; {path.note}")


def top_bottom(values: torch.Tensor, k: int = TOP_K) -> tuple[list[int], list[float], list[int], list[float]]:
    """(ids, values) of the k largest and the k smallest entries of a (d_vocab,) row."""
    top = values.topk(min(k, len(values)))
    bottom = (-values).topk(min(k, len(values)))
    return top.indices.tolist(), top.values.tolist(), bottom.indices.tolist(), (-bottom.values).tolist()


def visible(text: str, token_id: int) -> str:
    """A token as a table cell: spaces shown (they matter: " the" is not "the"), and its id where the
    text alone would not tell it apart (empty, unprintable, or a partial UTF-8 byte)."""
    if text and "\ufffd" not in text and text.replace(" ", "x").isprintable():
        return text.replace(" ", "\u2423")
    return "".join(ch for ch in text if ch.isprintable() and ch not in "\ufffd ") + f"[{token_id}]"


def render_logits(values: torch.Tensor, exact: bool, token: Callable[[int], str]) -> str:
    """One latent's logit tables (top and bottom TOP_K tokens) and its histogram over the vocabulary."""
    top_ids, top_vals, bot_ids, bot_vals = top_bottom(values)
    rows = "".join(
        f'<tr><td class="tokcell pos" title="token {a}">{html.escape(visible(token(a), a))}</td>'
        f'<td class="val pos">{va:+.3f}</td><td class="tokcell neg" title="token {b}">'
        f'{html.escape(visible(token(b), b))}</td><td class="val neg">{vb:+.3f}</td></tr>'
        for a, va, b, vb in zip(top_ids, top_vals, bot_ids, bot_vals))
    label = "" if exact else '<p class="approximation">approximation: the hook is not in the residual stream</p>'
    v = values.numpy().astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    counts, edges = np.histogram(v, bins=40, range=(lo, hi if hi > lo else lo + 1))
    chart = svg_bars(counts.tolist(), edges.tolist(), "logit effect", "tokens", cls="logit-histogram", width=360,
                     height=140, signed=True)
    return (f'<div class="logits">{label}<table class="logit-table"><thead><tr><th colspan="2">positive logits</th>'
            f'<th colspan="2">negative logits</th></tr></thead><tbody>{rows}</tbody></table>{chart}</div>')
