"""`pipeline eval`: how much of the language model's next-token loss an SAE keeps when it replaces
its hook's activations.

The model and hook come from the cache's manifest (the provenance `pipeline cache` recorded), the
contexts from the cache's own sequences table (`eval` split): no dataset download, and the
contexts are exactly those whose activations the SAE is evaluated on elsewhere. Four forward passes
per batch of contexts:

    clean     the model as is
    spliced   the hook's activations replaced by the SAE's reconstruction
    zero      the hook's activations replaced by 0
    mean      the hook's activations replaced by their mean over the split's cached rows

    CE loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)     for zero and mean
    KL                = KL(p_clean || p_spliced) of the next-token distributions

A transcoder reads its input hook and its reconstruction replaces its output hook (`hook_name_out`):
both are taken at the same positions of the same forward pass, and the ablations replace the output
hook. Where ablating barely changes the CE, CE loss recovered is flagged as not meaningful
(`ce_recovered`).

Only the positions the cache stores rows for are replaced (by default every token but BOS and
separators, whose activations are outliers the SAE never saw); the cross-entropy and KL are
averaged over every next-token prediction of the contexts, as SAELens's evals average the model's
loss. Replacing at unstored positions would measure the SAE on inputs it was not trained on.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from cache_writer.model_adapter import (
    HEAD_SUFFIX, ModelAdapter, module_output, adapter_from_hooked_transformer, load_model, per_token,
)
from pipeline.config import check_sizes
from pipeline.errors import PipelineError
from pipeline.reader import Cache
from analysis.inference import LoadedSAE, load_sae

Replace = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(own, read) -> new: maps the replaced hook's activations at the stored positions (n, d) to what the
model sees instead, given `read`, the rows the SAE reads there (its own hook's, or a transcoder's
input hook's)."""


@dataclass
class EvalConfig:
    """Everything `pipeline eval` takes."""

    sae: str
    """SAE directory (cfg.json + sae_weights.safetensors; ours or SAELens's)."""
    cache: str
    """Cache whose manifest names the model and hook, and whose sequences are the contexts."""
    split: str = "eval"
    """Split whose contexts (and mean activation) are used."""
    contexts: int = 128
    """Contexts (sequences) to run; fewer if the split has fewer."""
    batch_size: int = 8
    """Contexts per forward pass."""
    hook: str | None = None
    """Hook to splice at; default: the SAE's metadata hook_name, else the cache's only hook. A
    transcoder reads this hook and replaces its output hook (hook_name_out) with its reconstruction."""
    model: Any = None
    """Load this model instead of the one the manifest names (same argument as `pipeline cache --model`);
    from Python, also the model itself (a HookedTransformer or a ModelAdapter, e.g. the one a cache was
    written from in memory)."""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    out: str | None = None
    """`pipeline eval` also writes its results here, as SAEBench's core output JSON (analysis.core_metrics)."""
    max_rows: int | None = None
    """Cached rows of the split the activation metrics read (analysis.core_metrics; None: all)."""
    saebench: bool = False
    """Also SAEBench's core numbers of the spliced model (`saebench` in the results): one more forward
    pass per batch, the hook zero-ablated at every position as SAEBench ablates."""

    def __post_init__(self) -> None:
        check_sizes(self, positive=("contexts", "batch_size", "max_rows"))


# ------------------------------------------------------------------------------ model and contexts


def load_cache_model(cache: Cache, device: str, override: Any = None) -> ModelAdapter:
    """The model the cache was written with, loaded as `pipeline cache` loaded it (or `override`: a
    name, or a model object used as it is)."""
    prov = cache.manifest.get("provenance") or {}
    info = prov.get("model") or {}
    cc = prov.get("cache_config") or {}
    if isinstance(override, ModelAdapter):
        return override
    if override is not None and not isinstance(override, str):  # a HookedTransformer held in memory
        return adapter_from_hooked_transformer(override, info.get("name") or "in-memory")
    why = model_unavailable(cache, override)
    if why:
        raise PipelineError(f"cache {cache.path} {why}")
    # cache_config holds the exact --model argument (hf:ID stays hf:ID); older manifests only the info.
    name = override or cc.get("model") or info["name"]
    adapter = load_model(name, device=device, dtype=cc.get("model_dtype") or info.get("dtype") or "float32",
                         model_kwargs=cc.get("model_kwargs") or info.get("kwargs") or {},
                         trust_remote_code=bool(cc.get("trust_remote_code", False)))
    # TransformerLens's config dict holds the device, so its hash is only compared for the other sources.
    keys = ["weights_xxh3_64"] + (["config_hash"] if info.get("source") != "transformer_lens" else [])
    for key in keys:
        if info.get(key) and adapter.info.get(key) and info[key] != adapter.info[key]:
            warnings.warn(f"model {name!r} has {key} {adapter.info[key]}, the cache recorded {info[key]}: "
                          "the activations the SAE was trained on may come from another model")
    return adapter


def model_unavailable(cache: Cache, override: Any = None) -> str | None:
    """Why the cache's model cannot be loaded (completing "cache PATH ..."), or None when it can."""
    info = (cache.manifest.get("provenance") or {}).get("model") or {}
    if override is not None:
        return None
    if not info:
        return "records no model (its source was not a language model); pass --model"
    if info.get("source") == "in-memory":
        return (f"was written from a model held in memory ({info.get('name')}); pass --model, or from Python the "
                "model itself: EvalConfig(model=model)")
    return None


def special_token_ids(cache: Cache, tokenizer) -> set[int]:
    """Token ids whose positions `pipeline cache` stores no row for by default: the tokenizer's
    special tokens and the packing's BOS and separator (as cache_writer.run._blocks)."""
    from cache_writer.run import special_ids

    packing = ((cache.manifest.get("config") or {}).get("source") or {}).get("packing") or {}
    special = set(special_ids(tokenizer)[2])
    return special | {i for i in (packing.get("bos_token_id"), packing.get("separator_token_id")) if i is not None}


def stored_position_mask(cache: Cache, tokens: np.ndarray, tokenizer) -> np.ndarray:
    """(n, T) bool: the positions of `tokens` the cache stores rows for (as cache_writer.run._blocks)."""
    from cache_writer.run import parse_positions

    source = (cache.manifest.get("config") or {}).get("source") or {}
    keep = np.zeros(tokens.shape, dtype=bool)
    keep[:, parse_positions(source.get("positions"), tokens.shape[1])] = True
    if source.get("exclude_special_tokens", True):
        keep &= ~np.isin(tokens, np.array(sorted(special_token_ids(cache, tokenizer)), dtype=np.int64))
    return keep


def split_sequences(cache: Cache, split: str, n: int | None) -> np.ndarray:
    """The first `n` (all when None) contexts of a split's sequences table, (n, context_size) int64."""
    parts, have = [], 0
    for i in range(len(cache.shards(split))):
        if n is not None and have >= n:
            break
        seq = np.asarray(cache.sequences(split, i))
        parts.append(seq)
        have += len(seq)
    if not parts:
        raise PipelineError(f"cache {cache.path} has no {split!r} sequences; write it with --eval-fraction > 0 "
                            "or pass --split train")
    return np.concatenate(parts)[:n].astype(np.int64)


def split_mean(cache: Cache, hook: str, split: str) -> torch.Tensor:
    """Mean activation (d,) of a hook over a split's cached rows, streamed shard by shard in float64."""
    total, rows = torch.zeros(cache.hooks[hook], dtype=torch.float64), 0
    for i in range(len(cache.shards(split))):
        acts = cache.activations_tensor(hook, split, i)
        for start in range(0, len(acts), 65_536):
            total += acts[start:start + 65_536].double().sum(0)
        rows += len(acts)
    if rows == 0:  # no rows in the split: the train statistics the manifest keeps
        return torch.tensor(cache.hook_stats(hook)["mean"], dtype=torch.float32)
    return (total / rows).float()


def resolve_hook(cache: Cache, sae: LoadedSAE, hook: str | None) -> str:
    """The hook to splice at: given, else the SAE's own, else the cache's only one; checked for width."""
    hook = hook or sae.hook or (next(iter(cache.hooks)) if len(cache.hooks) == 1 else None)
    if hook is None:
        raise PipelineError(f"SAE {sae.path} names no hook and cache {cache.path} has several "
                            f"({', '.join(cache.hooks)}); pass --hook")
    cache.check_hook(hook)
    if cache.hooks[hook] != sae.d_in:
        raise PipelineError(f"SAE {sae.path} has d_in = {sae.d_in}, but hook {hook} of cache {cache.path} "
                            f"has width {cache.hooks[hook]}")
    return hook


def output_hook(cache: Cache, sae: LoadedSAE, hook: str) -> str:
    """The hook the SAE's reconstruction replaces: its own, or a transcoder's output hook (its
    metadata's hook_name_out), which the cache must hold too (its mean is the mean ablation)."""
    if not sae.is_transcoder:
        return hook
    out = sae.hook_out
    if out is None:
        raise PipelineError(f"transcoder {sae.path} names no output hook; set hook_name_out in the metadata "
                            "of its cfg.json")
    cache.check_hook(out)
    if cache.hooks[out] != sae.d_out:
        raise PipelineError(f"transcoder {sae.path} has d_out = {sae.d_out}, but its output hook {out} of cache "
                            f"{cache.path} has width {cache.hooks[out]}")
    return out


# ------------------------------------------------------------------------------ patched forward passes


def _replace_positions(act: torch.Tensor, mask: torch.Tensor, replace: Callable) -> torch.Tensor:
    """act (B, T, d) with the rows at mask (B, T) replaced by replace(rows)."""
    out = act.clone()
    out[mask] = replace(act[mask]).to(act.dtype)
    return out


def _tl_hook(hook: str) -> tuple[str, int | None]:
    """A TransformerLens hook name as (the hook point, the head the cache sliced out or None)."""
    m = HEAD_SUFFIX.match(hook)
    return (m["base"], int(m["head"])) if m else (hook, None)


def _rows_view(act: torch.Tensor, head: int | None) -> torch.Tensor:
    """A TransformerLens activation as the cache flattened it, (B, T, d): one head's slice, or the
    heads flattened into one row (hook_z and friends), or the plain activation."""
    if head is not None:
        return act[:, :, head]
    return act.flatten(2) if act.ndim == 4 else act


def _patch_activation(act: torch.Tensor, head: int | None, mask: torch.Tensor, replace: Callable) -> torch.Tensor:
    """A TransformerLens activation patched at the rows `_rows_view` gives."""
    if head is not None:
        out = act.clone()
        out[:, :, head] = _replace_positions(act[:, :, head], mask, replace)
        return out
    return _replace_positions(_rows_view(act, None), mask, replace).view_as(act)


def logits_with(adapter: ModelAdapter, tokens: torch.Tensor, hook: str, mask: torch.Tensor,
                replace: Replace | None, read_hook: str | None = None) -> torch.Tensor:
    """Logits (B, T, V) of the model with `replace(own, read)` applied at the hook's stored positions
    (clean: None); `read` are the rows of `read_hook` at those positions in the same forward (a
    transcoder's input hook), or `own` when None."""
    model = adapter.model
    read: dict[str, torch.Tensor] = {}

    def new_rows(own: torch.Tensor) -> torch.Tensor:
        if read_hook is None:
            return replace(own, own)
        if "rows" not in read:
            raise PipelineError(f"hook {read_hook} runs after {hook} in the model's forward: a transcoder reads "
                                "a hook that comes before the one it replaces")
        return replace(own, read["rows"])

    if adapter.kind == "transformer_lens":
        if replace is None:
            return model(tokens, return_type="logits")
        fwd_hooks = []
        if read_hook is not None:
            read_base, read_head = _tl_hook(read_hook)
            fwd_hooks.append((read_base, lambda act, hook=None: read.update(rows=_rows_view(act, read_head)[mask])))
        base, head = _tl_hook(hook)
        fwd_hooks.append((base, lambda act, hook=None: _patch_activation(act, head, mask, new_rows)))
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type="logits")
    handles = []
    if replace is not None:
        modules = dict(model.named_modules())

        def fn(module, inputs, output):
            act = module_output(output)
            new = _replace_positions(per_token(act, *mask.shape, hook), mask, new_rows).reshape(act.shape)
            if isinstance(output, tuple):
                return (new, *output[1:])
            if hasattr(output, "last_hidden_state"):
                output.last_hidden_state = new
                return output
            return new
        if read_hook is not None:
            handles.append(modules[read_hook].register_forward_hook(
                lambda module, inputs, output: read.update(
                    rows=per_token(module_output(output), *mask.shape, read_hook)[mask])))
        handles.append(modules[hook].register_forward_hook(fn))
    try:
        return model(input_ids=tokens, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log p (B, T, V) at every position, in float32."""
    return logits.float().log_softmax(dim=-1)


# ------------------------------------------------------------------------------ the evaluation

# CE loss recovered divides by the ablation's CE increase. Where ablating the hook raises the loss by
# less than 1% of the clean CE (or by less than 1e-3 nats), that divisor is as small as the
# differences between forward passes: the ratio can be any number (-28.9 was seen) and says nothing.
MIN_ABLATION_GAP_FRACTION = 0.01
MIN_ABLATION_GAP_NATS = 1e-3


def ce_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float,
                 ablation: str = "zero") -> tuple[float, str | None]:
    """(CE loss recovered, why it is not meaningful or None): (CE_ablated - CE_spliced) / (CE_ablated -
    CE_clean), flagged when the divisor is below MIN_ABLATION_GAP_FRACTION of the clean CE or
    MIN_ABLATION_GAP_NATS."""
    gap = ce_ablated - ce_clean
    score = (ce_ablated - ce_spliced) / gap if gap != 0 else math.nan
    floor = max(MIN_ABLATION_GAP_FRACTION * ce_clean, MIN_ABLATION_GAP_NATS)
    if gap >= floor:
        return score, None
    rule = (f"1% of the clean CE {ce_clean:.4g}" if floor > MIN_ABLATION_GAP_NATS
            else f"the {MIN_ABLATION_GAP_NATS:g} nats a ratio needs")
    return score, (f"{ablation} ablation changes the CE by {gap:+.4g} nats, less than {floor:.3g} ({rule}), so the "
                   "ratio divides by almost nothing: the model barely uses this hook on these contexts")



@torch.no_grad()
def evaluate_ce(cfg: EvalConfig, adapter: ModelAdapter | None = None, sae: LoadedSAE | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """The numbers `pipeline eval` prints (see the module docstring); `adapter`/`sae` skip loading;
    `progress` hears how far the forward passes are (for a `pipeline.console.Heartbeat`)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    cache = Cache(cfg.cache)
    sae = sae or load_sae(cfg.sae, device)
    hook = resolve_hook(cache, sae, cfg.hook)
    # A transcoder reads `hook` and its reconstruction replaces `hook_out`; an SAE's are one hook.
    hook_out = output_hook(cache, sae, hook)
    read_hook = hook if hook_out != hook else None
    adapter = adapter or load_cache_model(cache, device, cfg.model)
    adapter.check_hooks(list(dict.fromkeys([hook, hook_out])))
    from cache_writer.run import load_tokenizer

    cc = (cache.manifest.get("provenance") or {}).get("cache_config") or {}
    tokenizer = load_tokenizer(SimpleNamespace(tokenizer=cc.get("tokenizer")), adapter)
    contexts = split_sequences(cache, cfg.split, cfg.contexts)
    mask_all = stored_position_mask(cache, contexts, tokenizer)
    # SAEBench averages over the positions whose token is not special (BOS, EOS, padding).
    plain_all = ~np.isin(contexts, np.array(sorted(special_token_ids(cache, tokenizer)), dtype=np.int64))
    mean = split_mean(cache, hook_out, cfg.split).to(device)

    sums = dict(ce_clean=0.0, ce_spliced=0.0, ce_zero_ablation=0.0, ce_mean_ablation=0.0, kl_spliced=0.0,
                kl_zero_ablation=0.0, kl_mean_ablation=0.0)
    bench = dict(ce_clean=0.0, ce_spliced=0.0, ce_zero_everywhere=0.0, kl_spliced=0.0, kl_zero_everywhere=0.0)
    sq_err = l0 = 0.0
    act_sum = torch.zeros(sae.d_out, dtype=torch.float64)
    act_sq = 0.0
    n_pred = n_spliced = bench_pred = bench_pos = 0
    for start in range(0, len(contexts), cfg.batch_size):
        tokens = torch.from_numpy(contexts[start:start + cfg.batch_size]).to(adapter.device)
        mask = torch.from_numpy(mask_all[start:start + cfg.batch_size]).to(adapter.device)
        plain = torch.from_numpy(plain_all[start:start + cfg.batch_size]).to(adapter.device)
        targets = tokens[:, 1:].unsqueeze(-1)
        clean = _logprobs(logits_with(adapter, tokens, hook, mask, None))
        p_clean = clean.exp()

        def reconstruct(own: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
            nonlocal sq_err, act_sq, l0
            target = own.float()
            latents = sae.encode(read.float())
            recon = sae.model.decode(latents.unsqueeze(0), read.float())[0]
            sq_err += float((recon - target).pow(2).sum())
            act_sum.add_(target.double().sum(0).cpu())
            act_sq += float(target.double().pow(2).sum())
            l0 += float((latents > 0).sum())
            return recon

        def zero(own: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(own)

        # (name, replace, positions replaced): ours replace the stored positions; SAEBench zero-ablates
        # every position (BOS too), which is the spliced-at-stored pass where the cache stores all.
        variants: list[tuple[str, Replace | None, torch.Tensor]] = [
            ("clean", None, mask), ("spliced", reconstruct, mask), ("zero_ablation", zero, mask),
            ("mean_ablation", lambda own, read: mean.to(own.dtype).expand_as(own), mask)]
        if cfg.saebench:
            variants.append(("zero_everywhere", zero, torch.ones_like(mask)))
        zero_logp = None
        for name, replace, where in variants:
            if replace is None:
                logp = clean
            elif name == "zero_everywhere" and bool(mask.all()):
                logp = zero_logp  # every position is stored: the zero-ablation pass replaced them all
            else:
                logp = _logprobs(logits_with(adapter, tokens, hook_out, where, replace, read_hook))
            if name == "zero_ablation":
                zero_logp = logp
            ce = -logp[:, :-1].gather(-1, targets).squeeze(-1)  # (B, T-1): the prediction made at each position
            kl = (p_clean * (clean - logp)).sum(-1)  # (B, T)
            if name != "zero_everywhere":
                sums[f"ce_{name}"] += float(ce.sum())
                if replace is not None:
                    sums[f"kl_{name}"] += float(kl[:, :-1].sum())
            if cfg.saebench and f"ce_{name}" in bench:
                bench[f"ce_{name}"] += float(ce[plain[:, :-1]].sum())
                if replace is not None:
                    bench[f"kl_{name}"] += float(kl[plain].sum())
        n_pred += targets.numel()
        if progress is not None:
            done = start + len(tokens)
            progress(f"eval: CE loss and KL: {done:,}/{len(contexts):,} contexts ({done / len(contexts):.0%})")
        n_spliced += int(mask.sum())
        bench_pred += int(plain[:, :-1].sum())
        bench_pos += int(plain.sum())
    if n_spliced == 0:
        raise PipelineError(f"no position of the {len(contexts)} contexts has a cached row to replace")
    out = {k: v / n_pred for k, v in sums.items()}
    for ablation in ("zero", "mean"):
        score, note = ce_recovered(out["ce_clean"], out["ce_spliced"], out[f"ce_{ablation}_ablation"], ablation)
        out[f"ce_recovered_{ablation}"] = score
        out[f"ce_recovered_{ablation}_meaningful"] = note is None
        out[f"ce_recovered_{ablation}_note"] = note
    # Explained variance of the SAE on exactly the activations it replaced (against their own mean).
    total_var = act_sq - float(act_sum.pow(2).sum()) / n_spliced
    out.update({
        "ce_delta": out["ce_spliced"] - out["ce_clean"],
        "explained_variance": 1 - sq_err / total_var if total_var > 0 else math.nan,
        "l0": l0 / n_spliced, "contexts": len(contexts), "predictions": n_pred, "spliced_positions": n_spliced,
        "sae": str(sae.path), "architecture": sae.architecture, "hook": hook, "model": adapter.name,
        "cache": str(cache.path), "split": cfg.split,
    })
    if read_hook is not None:
        out["hook_out"] = hook_out
    if cfg.saebench:
        # Means over the predictions made at (CE), and the positions of (KL), tokens that are not special.
        out["saebench"] = {"ce_loss_without_sae": bench["ce_clean"] / max(bench_pred, 1),
                           "ce_loss_with_sae": bench["ce_spliced"] / max(bench_pred, 1),
                           "ce_loss_with_ablation": bench["ce_zero_everywhere"] / max(bench_pred, 1),
                           "kl_div_with_sae": bench["kl_spliced"] / max(bench_pos, 1),
                           "kl_div_with_ablation": bench["kl_zero_everywhere"] / max(bench_pos, 1),
                           "predictions": bench_pred, "positions": bench_pos,
                           "tokens": int(contexts.size), "context_size": int(contexts.shape[1])}
    return out


# (label, the key in `evaluate_ce`'s results or None, SAEBench's field of the same measure or None, format)
SPLICED_ROWS = (("CE clean (no SAE)", "ce_clean", "ce_loss_without_sae", ".4f"),
                ("CE with SAE", "ce_spliced", "ce_loss_with_sae", ".4f"),
                ("CE zero-ablated", "ce_zero_ablation", "ce_loss_with_ablation", ".4f"),
                ("CE mean-ablated", "ce_mean_ablation", None, ".4f"),
                ("CE loss recovered (zero)", "ce_recovered_zero", "ce_loss_score", ".4f"),
                ("CE loss recovered (mean)", "ce_recovered_mean", None, ".4f"),
                ("CE increase", "ce_delta", None, ".4f"),
                ("KL(clean || SAE)", "kl_spliced", "kl_div_with_sae", ".5f"),
                ("KL(clean || zero-ablated)", "kl_zero_ablation", "kl_div_with_ablation", ".5f"),
                ("KL score", None, "kl_div_score", ".4f"),
                ("explained variance", "explained_variance", None, ".4f"), ("L0", "l0", None, ".1f"))
# Where SAEBench's numbers sit beside these, the core table shows explained variance and L0 (on
# every cached row of the split): these two rows, on the replaced positions only, would be a second,
# different pair of the same names.
CORE_SHOWS = ("explained_variance", "l0")


def print_results(res: dict, saebench: dict[str, float] | None = None) -> None:
    """The results as a rich table; with `saebench` (field -> value of SAEBench's two spliced-model
    categories, from the same passes; `res["saebench_predictions"]` their count), its numbers in a
    column beside ours, each measure on one row and each column saying which predictions it
    averages: the two differ (see the note printed)."""
    from rich.table import Table

    from pipeline.console import log_console

    console = log_console()
    where = f"reading {res['hook']}, replacing {res['hook_out']}" if res.get("hook_out") else f"at {res['hook']}"
    console.print(f"SAE {res['sae']} ({res['architecture']}) {where} of model {res['model']}: "
                  f"{res['contexts']} {res['split']} contexts of {res['cache']}, {res['predictions']:,} predictions, "
                  f"{res['spliced_positions']:,} positions replaced", highlight=False, soft_wrap=True)
    table = Table(title="the SAE spliced into the model" if saebench else None)
    table.add_column("metric")
    table.add_column(f"all {res['predictions']:,} predictions" if saebench else "value", justify="right")
    if saebench:
        table.add_column(f"SAEBench: the {res['saebench_predictions']:,} at non-special tokens", justify="right")
        table.add_column("SAEBench field")
    for label, key, field, fmt in SPLICED_ROWS:
        if saebench and key in CORE_SHOWS or not saebench and key is None:
            continue
        ours = "" if key is None else format(res[key], fmt) + (
            " (not meaningful)" if res.get(f"{key}_meaningful") is False else "")
        theirs = ([format(saebench[field], fmt), field] if field else ["", ""]) if saebench else []
        table.add_row(label, ours, *theirs)
    console.print(table)
    for ablation in ("zero", "mean"):
        if res.get(f"ce_recovered_{ablation}_note"):
            console.print(f"note: CE loss recovered ({ablation}) is not meaningful: "
                          f"{res[f'ce_recovered_{ablation}_note']}", highlight=False, soft_wrap=True)
    if saebench:
        console.print("note: the columns average different predictions, so their CE and KL differ: SAEBench's "
                      "leaves out the predictions made at special tokens (BOS, separators) and zero-ablates every "
                      "position, BOS included; the first counts every prediction and replaces only the positions "
                      "the cache stores rows for (docs/METRICS.md).", highlight=False, soft_wrap=True)


def ce_columns(cache: str, contexts: int) -> Callable[[list[dict], Path, str], None]:
    """For `trainer.sweep.run_sweep(evaluate_runs=...)`: adds CE loss recovered (zero and mean
    ablation) and KL to the row of each exported run, on `contexts` eval contexts of `cache`, the
    model loaded once."""

    def add(rows: list[dict], out: Path, device: str) -> None:
        adapter = load_cache_model(Cache(cache), device)
        for row in rows:
            if row["status"] == "ok":
                ce = evaluate_ce(EvalConfig(sae=str(out / row["run"]), cache=cache, contexts=contexts, device=device),
                                 adapter=adapter)
                row.update(ce_recovered_zero=ce["ce_recovered_zero"], ce_recovered_mean=ce["ce_recovered_mean"],
                           kl=ce["kl_spliced"])

    return add
