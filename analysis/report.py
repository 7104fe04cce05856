"""`pipeline report`: a static HTML page to look at a trained SAE.

One streaming pass over a split of the cache encodes every row and keeps, for every latent at once
(tensors over latents, never Python loops over rows): how often it fires, the L0 of each row, a
histogram of its log10 activations, and its top-K activations with their (sequence, position),
merged chunk by chunk with one `torch.topk` over [running top-K; chunk]. Then latents are chosen
(given, densest, random, or half each) and each one's top contexts are read back from the split's
sequences table, decoded (the manifest names the tokenizer) and shaded by the latent's activation
on every token of the window (a second, small read of the rows of just those sequences).

The page is one self-contained file (`OUT/index.html`): inline CSS, SVG charts and a few lines of
JS, no server and no network. Stable ids and classes (`#summary`, `#density-histogram`,
`#l0-histogram`, `.latent`, `.activation-histogram`, `.logit-table`, `.logit-histogram`,
`.context-table`, `.tok.max`) let tests and scripts find its parts. Logit effects (the top and
bottom tokens of each latent's decoder direction through the unembedding) come from
`analysis.logit_effects`, with the model the cache names.
"""

from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config import check_sizes
from pipeline.console import Heartbeat, Status
from pipeline.errors import PipelineError
from pipeline.reader import Cache
from analysis.inference import LoadedSAE, load_sae, split_chunks
from analysis.svg import svg_bars

# Per-latent activation histograms: log10 bins fixed in advance, so one pass serves every latent
# whatever its scale (values outside land in the end bins).
HIST_LO, HIST_HI, HIST_BINS = -4.0, 4.0, 80


@dataclass
class ReportConfig:
    """Everything `pipeline report` takes."""

    sae: str
    """SAE directory (cfg.json + sae_weights.safetensors; ours or SAELens's)."""
    cache: str
    """Cache to read activations and contexts from."""
    out: str = "report"
    """Directory to write index.html into."""
    split: str = "eval"
    """Split to stream over."""
    hook: str | None = None
    """Hook to read; default: the SAE's metadata hook_name, else the cache's only hook."""
    latents: list[int] | None = None
    """Latents to show; default: chosen by `select`."""
    n_latents: int = 16
    """How many latents to show when none are given."""
    select: str = "mixed"
    """top (densest), random (among live latents), or mixed (half each)."""
    contexts: int = 10
    """Top-activating contexts per latent."""
    left: int = 40
    """Tokens shown before the activating token."""
    right: int = 10
    """Tokens shown after it."""
    max_rows: int | None = None
    """Stop the pass after this many rows (None: the whole split)."""
    chunk_rows: int | None = None
    """Rows encoded at once (default: about 256 MiB of latents, at most 8192)."""
    seed: int = 0
    """Seed of the random choice of latents."""
    ce_contexts: int = 0
    """Also run `pipeline eval` on this many contexts and show CE loss recovered in the summary (0: no)."""
    logits: bool = True
    """Show each latent's logit effects (loads the model the cache names; skipped, saying why, without one)."""
    model: Any = None
    """Load this model instead of the one the manifest names (as `pipeline eval --model`); from Python,
    also the model itself."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""

    def __post_init__(self) -> None:
        check_sizes(self, positive=("n_latents", "contexts", "max_rows", "chunk_rows"),
                    non_negative=("left", "right", "ce_contexts"))


# ------------------------------------------------------------------------------ the streaming pass


@dataclass
class LatentStats:
    """What the pass keeps for every latent: (d_sae,)-shaped counters and (K, d_sae) top-K."""

    rows: int
    """Rows seen."""
    fired: torch.Tensor
    """(d_sae,) rows where the latent was > 0."""
    l0_counts: torch.Tensor
    """(d_sae + 1,) rows by their L0."""
    hist: torch.Tensor
    """(d_sae, HIST_BINS) counts of log10 activation (positive activations only)."""
    top_vals: torch.Tensor
    """(K, d_sae) the largest activations, descending (0 where fewer fired)."""
    top_seq: torch.Tensor
    """(K, d_sae) their sequence (index into the split's sequences table; -1: none)."""
    top_pos: torch.Tensor
    """(K, d_sae) their position in the sequence."""

    @property
    def density(self) -> torch.Tensor:
        return self.fired.double() / max(self.rows, 1)


def new_stats(d_sae: int, k: int, device: str) -> LatentStats:
    long = dict(dtype=torch.long, device=device)
    return LatentStats(rows=0, fired=torch.zeros(d_sae, **long), l0_counts=torch.zeros(d_sae + 1, **long),
                       hist=torch.zeros(d_sae, HIST_BINS, **long), top_vals=torch.zeros(k, d_sae, device=device),
                       top_seq=torch.full((k, d_sae), -1, **long), top_pos=torch.zeros(k, d_sae, **long))


def update_stats(st: LatentStats, latents: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> None:
    """Fold a chunk of latents (n, d_sae), with each row's sequence and position (n,), into `st`."""
    n, d_sae = latents.shape
    k = st.top_vals.shape[0]
    active = latents > 0
    st.rows += n
    st.fired += active.sum(0)
    st.l0_counts += torch.bincount(active.sum(1), minlength=d_sae + 1)
    rows, cols = active.nonzero(as_tuple=True)
    b = ((latents[rows, cols].log10() - HIST_LO) * (HIST_BINS / (HIST_HI - HIST_LO))).floor().long()
    st.hist.view(-1).index_add_(0, cols * HIST_BINS + b.clamp(0, HIST_BINS - 1),
                                torch.ones_like(cols))
    # Running top-K per latent: candidates are the K kept so far, then the chunk's n rows. Index
    # i < K is an old entry, i >= K is chunk row i - K: gathers, no (n, d_sae) index tensor.
    vals, idx = torch.cat([st.top_vals, latents]).topk(k, dim=0)
    old = idx < k
    new_row = (idx - k).clamp(min=0)
    st.top_seq = torch.where(old, st.top_seq.gather(0, idx.clamp(max=k - 1)), seq[new_row])
    st.top_pos = torch.where(old, st.top_pos.gather(0, idx.clamp(max=k - 1)), pos[new_row])
    st.top_vals = vals


def default_chunk_rows(d_sae: int) -> int:
    """Rows per encode such that the (rows, d_sae) float32 latents take about 256 MiB."""
    return max(256, min(8192, 2**26 // d_sae))


def stream_stats(cache: Cache, sae: LoadedSAE, hook: str, split: str, k: int, chunk_rows: int,
                 max_rows: int | None, device: str, progress: Callable[[str], None] | None = None) -> LatentStats:
    """One pass over the split's shards, in disk order; `progress` hears the rows read."""
    st = new_stats(sae.d_sae, k, device)
    rows = min(sum(s["rows"] for s in cache.shards(split)), max_rows or math.inf)
    for _, (acts,), tok in split_chunks(cache, [hook], split, chunk_rows, max_rows):
        seq_pos = tok[:, 1:].to(device)
        update_stats(st, sae.encode(acts.to(device=device, dtype=torch.float32)), seq_pos[:, 0], seq_pos[:, 1])
        if progress is not None:
            progress(f"report: the pass over {split}: {st.rows:,}/{rows:,} rows ({st.rows / rows:.0%})")
    return st


def choose_latents(st: LatentStats, cfg: ReportConfig) -> list[int]:
    """The latents to show, in page order."""
    d_sae = st.fired.numel()
    if cfg.latents:
        bad = [i for i in cfg.latents if not 0 <= i < d_sae]
        if bad:
            raise PipelineError(f"latents {bad} are outside 0..{d_sae - 1}")
        return list(dict.fromkeys(cfg.latents))
    if cfg.select not in ("top", "random", "mixed"):
        raise PipelineError(f"unknown select {cfg.select!r}; use top, random or mixed")
    n = min(cfg.n_latents, d_sae)
    by_density = torch.argsort(st.fired.cpu(), descending=True, stable=True).tolist()
    n_top = n if cfg.select == "top" else 0 if cfg.select == "random" else (n + 1) // 2
    chosen = by_density[:n_top]
    taken = set(chosen)
    alive = [i for i in (st.fired.cpu() > 0).nonzero().flatten().tolist() if i not in taken]
    g = torch.Generator().manual_seed(cfg.seed)
    chosen += sorted(alive[i] for i in torch.randperm(len(alive), generator=g)[:n - n_top].tolist())
    return chosen


# ------------------------------------------------------------------------------ contexts


class SequenceTable:
    """The split-wide sequences table, read a row at a time from its shards (memory-mapped)."""

    def __init__(self, cache: Cache, split: str):
        self.cache, self.split = cache, split
        counts = [s["sequences"] for s in cache.shards(split)]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def shard_of(self, seq: int) -> int:
        return int(np.searchsorted(self.starts, seq, side="right") - 1)

    def __getitem__(self, seq: int) -> np.ndarray:
        shard = self.shard_of(seq)
        return np.asarray(self.cache.sequences(self.split, shard)[seq - self.starts[shard]])


def context_activations(cache: Cache, sae: LoadedSAE, hook: str, split: str, table: SequenceTable,
                        seqs: set[int], latents: list[int], device: str) -> dict[int, np.ndarray]:
    """sequence -> (context_size, len(latents)) activations of the chosen latents at every stored
    position of the sequence (0 where the cache has no row: BOS, separators)."""
    out: dict[int, np.ndarray] = {}
    ctx = int(cache.manifest.get("context_size") or 0)
    by_shard: dict[int, list[int]] = {}
    for s in seqs:
        by_shard.setdefault(table.shard_of(s), []).append(s)
    cols = torch.tensor(latents, device=device)
    for shard, shard_seqs in by_shard.items():
        tok = np.asarray(cache.tokens(split, shard))
        rows = np.flatnonzero(np.isin(tok[:, 1], shard_seqs))
        acts = cache.activations_tensor(hook, split, shard)
        step = default_chunk_rows(sae.d_sae)
        vals = torch.cat([sae.encode(acts[torch.from_numpy(rows[i:i + step])].to(device).float())[:, cols]
                          for i in range(0, len(rows), step)]).cpu().numpy() if len(rows) else np.zeros((0, 0))
        for s in shard_seqs:
            out[s] = np.zeros((ctx or int(tok[:, 2].max()) + 1, len(latents)), dtype=np.float32)
        for r, v in zip(rows, vals):
            out[int(tok[r, 1])][int(tok[r, 2])] = v
    return out


def cache_tokenizer(cache: Cache) -> Any:
    """The tokenizer the cache was written with (the manifest names it), or None if it cannot load."""
    prov = cache.manifest.get("provenance") or {}
    name = ((prov.get("cache_config") or {}).get("tokenizer") or prov.get("tokenizer")
            or (cache.manifest.get("config") or {}).get("source", {}).get("tokenizer"))
    if not name:
        return None
    from cache_writer.pretokenize import load_named_tokenizer

    try:
        return load_named_tokenizer(name)
    except Exception as e:  # offline without the tokenizer's files: show token ids instead
        warnings.warn(f"could not load tokenizer {name!r} ({str(e).splitlines()[0] if str(e) else e}); "
                      "showing token ids")
        return None


def token_text(tokenizer: Any, token_id: int, special: set[int]) -> str:
    """One token as displayed text (whitespace made visible)."""
    if token_id in special:
        return "<bos>" if getattr(tokenizer, "bos_token_id", None) == token_id else f"<{token_id}>"
    if tokenizer is None:
        return f"[{token_id}]"
    try:
        text = tokenizer.decode_token(token_id) if hasattr(tokenizer, "decode_token") else tokenizer.decode([token_id])
    except (IndexError, KeyError, ValueError, OverflowError, TypeError):  # an id past the tokenizer's vocabulary
        return f"[{token_id}]"
    return text.replace("\n", "↵").replace("\t", "→").replace("\r", "␍")


# ------------------------------------------------------------------------------ SVG and HTML


def density_chart(st: LatentStats) -> str:
    density = st.density.cpu()
    alive = density[density > 0].log10()
    dead = int((density == 0).sum())
    lo = math.floor(float(alive.min())) if len(alive) else -6.0
    edges = np.linspace(lo, 0.0, 41)
    counts = np.histogram(alive.numpy(), bins=edges)[0] if len(alive) else np.zeros(40)
    return svg_bars(counts.tolist(), edges.tolist(), "log10 feature density (fraction of tokens a latent fires on)",
                    "latents", elem_id="density-histogram", note=f"{dead} dead latents not shown" if dead else "")


def l0_chart(st: LatentStats) -> str:
    counts = st.l0_counts.cpu().numpy()
    top = int(np.flatnonzero(counts).max()) if counts.any() else 1
    width = max(1, math.ceil((top + 1) / 60))  # at most ~60 bars: integer L0 values grouped
    n_bins = math.ceil((top + 1) / width)
    grouped = np.add.reduceat(counts[: n_bins * width], np.arange(0, n_bins * width, width))
    edges = [i * width - 0.5 for i in range(n_bins + 1)]
    return svg_bars(grouped.tolist(), edges, "L0 (latents active per token)", "tokens", elem_id="l0-histogram")


def activation_chart(st: LatentStats, latent: int) -> str:
    h = st.hist[latent].cpu().numpy()
    nz = np.flatnonzero(h)
    a, b = (int(nz.min()), int(nz.max()) + 1) if len(nz) else (0, HIST_BINS)
    a, b = max(0, a - 1), min(HIST_BINS, b + 1)
    step = (HIST_HI - HIST_LO) / HIST_BINS
    edges = [HIST_LO + i * step for i in range(a, b + 1)]
    return svg_bars(h[a:b].tolist(), edges, "log10 activation (where > 0)", "tokens", cls="activation-histogram",
                    width=360, height=150)


CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:24px 0 8px}h3{font-size:14px;margin:0 0 6px}
table.summary td{padding:1px 12px 1px 0}table.summary td:first-child{color:#666}
.charts{display:flex;flex-wrap:wrap;gap:24px}
svg .bar{fill:#4878d0}svg .axis{stroke:#444}svg text{font-size:10px;fill:#444}svg .label{font-size:11px}
svg .note{fill:#a33}
.latent{border-top:1px solid #ddd;padding:12px 0;display:flex;gap:20px;align-items:flex-start}
.latent .meta{flex:0 0 360px}.latent .meta p{margin:2px 0;color:#555}
table.context-table{border-collapse:collapse;font:12px/1.5 ui-monospace,Menlo,Consolas,monospace}
table.context-table td{padding:1px 6px;border-bottom:1px solid #f0f0f0;vertical-align:top}
table.context-table td.val{text-align:right;color:#555;white-space:nowrap}
table.context-table td.ctx{white-space:pre-wrap;word-break:break-all}
.tok{border-radius:2px}.tok.max{outline:1.5px solid #c00;font-weight:bold}.tok.special{color:#999}
#filter{margin:8px 0}.hidden{display:none}
svg .bar.neg{fill:#d62728}
table.logit-table{border-collapse:collapse;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;margin:6px 0}
table.logit-table th{font:bold 11px system-ui,sans-serif;color:#555;text-align:left;padding:0 6px}
table.logit-table td{padding:0 6px;white-space:pre}table.logit-table td.val{text-align:right}
table.logit-table td.pos{color:#1f4e9c}table.logit-table td.neg{color:#b02020}
.approximation{color:#a33;font-weight:bold;margin:4px 0}
"""

JS = """
document.body.dataset.ready = "1";
const box = document.getElementById("filter-input");
box.addEventListener("input", () => {
  const want = box.value.split(/[ ,]+/).filter(Boolean);
  for (const el of document.querySelectorAll(".latent")) {
    el.classList.toggle("hidden", want.length > 0 && !want.includes(el.dataset.latent));
  }
});
"""


def render_context(tokens: np.ndarray, acts: np.ndarray, pos: int, scale: float, tokenizer: Any,
                   special: set[int], left: int, right: int) -> str:
    """One context window as token spans shaded by activation; the activating token outlined."""
    spans = []
    for p in range(max(0, pos - left), min(len(tokens), pos + right + 1)):
        t, v = int(tokens[p]), float(acts[p])
        cls = "tok" + (" max" if p == pos else "") + (" special" if t in special else "")
        style = f' style="background:rgba(255,110,0,{min(1.0, v / scale):.2f})"' if v > 0 and scale > 0 else ""
        spans.append(f'<span class="{cls}"{style} title="pos {p}: {v:.3g}">'
                     f'{html.escape(token_text(tokenizer, t, special))}</span>')
    return "".join(spans)


def best_per_sequence(vals: np.ndarray, seqs: np.ndarray, positions: np.ndarray,
                      n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top `n` of one latent's (value-sorted) top activations, one per sequence: neighbouring
    tokens of one sequence often fill a latent's top list, and its context shows them all anyway."""
    keep, seen = [], set()
    for i, (v, s) in enumerate(zip(vals, seqs)):
        if v > 0 and s >= 0 and int(s) not in seen:
            seen.add(int(s))
            keep.append(i)
            if len(keep) == n:
                break
    return vals[keep], seqs[keep], positions[keep]


def render_latent(st: LatentStats, latent: int, vals: np.ndarray, seqs: np.ndarray, positions: np.ndarray,
                  context: Any, tokenizer: Any, special: set[int], cfg: ReportConfig, logits: str = "") -> str:
    """One latent's block: density, activation histogram, logit effects (`logits`, rendered), and its
    top contexts (`context(seq)` gives the sequence's tokens and this latent's activation at each of
    its positions)."""
    scale = float(vals[0]) if len(vals) else 0.0
    rows = []
    for v, s, p in zip(vals, seqs, positions):
        if v <= 0 or s < 0:  # fewer than K activations > 0 on the split
            continue
        tokens, acts = context(int(s))
        ctx = render_context(tokens, acts, int(p), scale, tokenizer, special, cfg.left, cfg.right)
        rows.append(f'<tr><td class="val">{v:.3g}</td><td class="ctx">{ctx}</td></tr>')
    body = (f'<table class="context-table"><tbody>{"".join(rows)}</tbody></table>' if rows
            else '<p class="empty">never fires on this split</p>')
    d = float(st.density[latent])
    return (f'<div class="latent" id="latent-{latent}" data-latent="{latent}"><div class="meta">'
            f'<h3>latent {latent}</h3><p>density {d:.3g} ({math.log10(d) if d > 0 else float("-inf"):.2f} log10), '
            f'max {scale:.3g}</p>{activation_chart(st, latent)}{logits}</div>{body}</div>')


def render_page(cfg: ReportConfig, sae: LoadedSAE, cache: Cache, hook: str, st: LatentStats, chosen: list[int],
                latent_html: list[str], extra: dict[str, str]) -> str:
    density = st.density.cpu()
    l0 = (st.l0_counts.cpu().double() * torch.arange(st.l0_counts.numel())).sum() / max(st.rows, 1)
    prov = cache.manifest.get("provenance") or {}
    summary = {
        "SAE": str(sae.path), "architecture": sae.architecture + (f" (k = {sae.cfg['k']})" if "k" in sae.cfg else ""),
        "d_in / d_sae": f"{sae.d_in} / {sae.d_sae}" + (f" / d_out {sae.d_out}" if sae.is_transcoder else ""),
        "hook": hook + (f" (reconstructs {sae.hook_out})" if sae.is_transcoder else ""),
        "model": (prov.get("model") or {}).get("name"),
        "cache": f"{cache.path} ({cfg.split} split, {st.rows:,} rows read)", "mean L0": f"{float(l0):.2f}",
        "dead latents": f"{int((density == 0).sum())} ({float((density == 0).double().mean()):.1%})",
        "dense latents (> 10% of tokens)": str(int((density > 0.1).sum())), **extra,
    }
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>SAE report: {html.escape(str(sae.path))}'
        f'</title><style>{CSS}</style></head><body>'
        f'<h1>SAE report</h1><table class="summary" id="summary">{rows}</table>'
        f'<h2>Feature density and L0</h2><div class="charts">{density_chart(st)}{l0_chart(st)}</div>'
        f'<h2>Latents ({len(chosen)}: {html.escape(cfg.select if not cfg.latents else "given")})</h2>'
        f'<div id="filter"><label>show latents <input id="filter-input" placeholder="e.g. 12, 40"></label></div>'
        f'<div id="latents">{"".join(latent_html)}</div><script>{JS}</script></body></html>'
    )


# ------------------------------------------------------------------------------ the command


def ce_summary(cfg: ReportConfig, sae: LoadedSAE, device: str, adapter: Any = None) -> dict[str, str]:
    """`pipeline eval`'s headline numbers as summary rows (loads the cache's model unless given)."""
    from analysis.evaluate_ce import EvalConfig, evaluate_ce

    res = evaluate_ce(EvalConfig(sae=cfg.sae, cache=cfg.cache, split=cfg.split, contexts=cfg.ce_contexts,
                                 hook=cfg.hook, device=device, model=cfg.model), adapter=adapter, sae=sae)
    return {"CE clean / with SAE": f"{res['ce_clean']:.4f} / {res['ce_spliced']:.4f} ({res['contexts']} contexts)",
            "CE loss recovered (zero / mean ablation)": " / ".join(
                f"{res[f'ce_recovered_{a}']:.4f}" + ("" if res[f"ce_recovered_{a}_meaningful"] else " (not meaningful)")
                for a in ("zero", "mean")),
            **{f"note on CE loss recovered ({a})": res[f"ce_recovered_{a}_note"] for a in ("zero", "mean")
               if res[f"ce_recovered_{a}_note"]},
            "KL(clean || SAE)": f"{res['kl_spliced']:.5f}"}


def latent_logits(cfg: ReportConfig, cache: Cache, sae: LoadedSAE, hook: str, chosen: list[int], token: Any,
                  device: str) -> tuple[list[str], dict[str, str], Any]:
    """(each chosen latent's logit-effect block, summary rows, the model loaded or None). Without a
    model (none recorded, or it cannot be loaded) the blocks are empty and a summary row says why."""
    from analysis.evaluate_ce import load_cache_model, model_unavailable
    from analysis.logit_effects import logit_effects, render_logits

    none = [""] * len(chosen)
    if not cfg.logits:
        return none, {}, None
    why = model_unavailable(cache, cfg.model)
    if why:
        return none, {"logit effects": f"not shown: the cache {why}"}, None
    try:
        adapter = load_cache_model(cache, device, cfg.model)
    except (PipelineError, OSError) as e:  # e.g. offline without the model's files: the rest of the page stands
        warnings.warn(f"logit effects not shown: {str(e).splitlines()[0] if str(e) else e}")
        return none, {"logit effects": f"not shown: the model did not load ({str(e).splitlines()[0]})"}, None
    # A transcoder's decoder writes its output hook.
    eff = logit_effects(adapter, sae.hook_out if sae.is_transcoder else hook, sae.model.W_dec[0][chosen].detach())
    row = {"logit effects": ("" if eff.exact else "APPROXIMATION: ") + eff.note}
    if eff.values is None:
        return none, row, adapter
    return [render_logits(eff.values[j], eff.exact, token) for j in range(len(chosen))], row, adapter


def parse_latents(spec: str | None) -> list[int] | None:
    """'1,2,3' -> [1, 2, 3]."""
    if not spec:
        return None
    try:
        return [int(p) for p in spec.replace(" ", "").split(",") if p]
    except ValueError:
        raise PipelineError(f"--latents {spec!r} is not a comma-separated list of latent ids") from None


def build_report(cfg: ReportConfig, sae: LoadedSAE | None = None, extra: dict[str, str] | None = None) -> Path:
    """Write OUT/index.html; returns its path. `extra` adds rows to the summary (e.g. CE results).
    Says what it does at once and then at least every 10 s (a pass over a large split takes minutes)."""
    status = Status(f"report: loading {cfg.sae}")
    with Heartbeat(status.line):
        return _build_report(cfg, sae, extra, status.set)


@torch.no_grad()
def _build_report(cfg: ReportConfig, sae: LoadedSAE | None, extra: dict[str, str] | None,
                  say: Callable[[str], None]) -> Path:
    from analysis.evaluate_ce import resolve_hook

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    cache = Cache(cfg.cache)
    if not cache.manifest.get("has_tokens"):
        raise PipelineError(f"cache {cache.path} stores no tokens, so there are no contexts to show")
    if not cache.shards(cfg.split):
        raise PipelineError(f"cache {cache.path} has no {cfg.split!r} rows; pass --split train")
    sae = sae or load_sae(cfg.sae, device)
    hook = resolve_hook(cache, sae, cfg.hook)
    # 3x the contexts shown: room to keep only each sequence's best one (best_per_sequence).
    st = stream_stats(cache, sae, hook, cfg.split, 3 * cfg.contexts,
                      cfg.chunk_rows or default_chunk_rows(sae.d_sae), cfg.max_rows, device, say)
    chosen = choose_latents(st, cfg)
    say(f"report: top contexts and logit effects of {len(chosen)} latents")
    top = [best_per_sequence(*(t[:, latent].cpu().numpy() for t in (st.top_vals, st.top_seq, st.top_pos)),
                             cfg.contexts) for latent in chosen]
    table = SequenceTable(cache, cfg.split)
    seqs = {int(s) for _, top_seq, _ in top for s in top_seq}
    acts = context_activations(cache, sae, hook, cfg.split, table, seqs, chosen, device)
    tokenizer = cache_tokenizer(cache)
    packing = ((cache.manifest.get("config") or {}).get("source") or {}).get("packing") or {}
    special = {i for i in (packing.get("bos_token_id"), packing.get("separator_token_id")) if i is not None}
    logits, logit_rows, adapter = latent_logits(cfg, cache, sae, hook, chosen,
                                                lambda t: token_text(tokenizer, t, special), device)
    latent_html = [render_latent(st, latent, *top[j], lambda s, j=j: (table[s], acts[s][:, j]), tokenizer,
                                 special, cfg, logits[j])
                   for j, latent in enumerate(chosen)]
    extra = {**(extra or {}), **logit_rows}
    if cfg.ce_contexts:
        extra.update(ce_summary(cfg, sae, device, adapter))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    page.write_text(render_page(cfg, sae, cache, hook, st, chosen, latent_html, extra), encoding="utf-8")
    return page
