"""SAEBench's core evaluation of an SAE, on a cache: `pipeline eval` and its `-o FILE.json`.

SAEBench (sae-bench 0.6.0, `sae_bench/evals/core/main.py`, "from SAELens") reports, per SAE:

    model_behavior_preservation     KL of the model's next-token distributions with the SAE spliced in,
                                    and with the hook zero-ablated; kl_div_score = 1 - KL_SAE / KL_ablated
    model_performance_preservation  CE loss without the SAE, with it, with the hook zero-ablated;
                                    ce_loss_score = (CE_ablated - CE_SAE) / (CE_ablated - CE_clean)
    reconstruction_quality          explained variance (and its legacy per-token form), MSE, cosine
    shrinkage                       L2 norms in and out, their ratio, relative reconstruction bias
    sparsity                        L0, L1
    token_stats                     tokens each part read
    misc_metrics                    fraction of latents alive, firing on > 1% / > 10% of tokens (and
                                    those fractions weighted by density), mean max encoder and decoder
                                    cosine similarity between latents
    eval_result_details             per latent: density, activations per prompt it fires in, encoder
                                    bias and norm, encoder-decoder cosine, max cosines

Here the activation metrics read the cache's cached rows of a split (the model is not run for
them), the spliced-model metrics run the model the cache names on the split's own contexts (the
passes of `analysis.evaluate_ce`, one more for SAEBench's everywhere-zero ablation), and the output
JSON has SAEBench's field names and nesting (`CoreEvalOutput`), so its rows compare with published
SAEBench results. docs/METRICS.md defines every field and says where a definition here differs
from the 0.6.0 code and why (its `explained_variance` measures variance about zero, a known bug;
its `mse` divides by the batch's token count).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.console import Heartbeat, Status
from pipeline.errors import PipelineError
from pipeline.reader import Cache
from analysis.evaluate_ce import (EvalConfig, evaluate_ce, model_unavailable, output_hook, print_results,
                                  resolve_hook, special_token_ids)
from analysis.inference import LoadedSAE, load_sae, split_chunks

SAEBENCH_VERSION = "0.6.0"
"""The sae-bench release whose core eval (field names, nesting, definitions) this follows."""
FLOAT_PRECISION = 10
"""Digits per-latent values are rounded to (SAEBench's DEFAULT_FLOAT_PRECISION)."""

# The categories of `eval_result_metrics` and their fields, in SAEBench's order (CoreMetricCategories).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                       "ce_loss_without_sae"),
    "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": ("freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                     "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                     "average_max_decoder_cosine_sim", "frac_alive"),
}
MODEL_CATEGORIES = ("model_behavior_preservation", "model_performance_preservation")
DETAIL_FIELDS = ("index", "feature_density", "consistent_activation_heuristic", "encoder_bias", "encoder_norm",
                 "encoder_decoder_cosine_sim", "max_decoder_cosine_sim", "max_encoder_cosine_sim")


# ------------------------------------------------------------------------------ activation metrics


def _sums(d_sae: int, d: int, device: str) -> dict[str, Any]:
    f64 = dict(dtype=torch.float64, device=device)
    sums: dict[str, Any] = {k: torch.zeros((), **f64) for k in (
        "norm_in", "norm_out", "ratio", "out_sq", "dot", "l0", "l1", "resid", "x_sq", "legacy", "cos")}
    sums.update(x=torch.zeros(d, **f64), fired=torch.zeros(d_sae, dtype=torch.long, device=device),
                prompts=torch.zeros(d_sae, dtype=torch.long, device=device))
    return sums


def _plain_rows(tok: torch.Tensor | None, special: torch.Tensor, n: int, device: str) -> torch.Tensor:
    """(n,) bool: rows whose token is not special (every row when the cache stores no tokens)."""
    if tok is None or special.numel() == 0:
        return torch.ones(n, dtype=torch.bool, device=device)
    return ~torch.isin(tok[:, 0].to(device), special)


@torch.no_grad()
def activation_metrics(cache: Cache, sae: LoadedSAE, hook: str, hook_out: str, split: str, special: set[int],
                       max_rows: int | None, chunk_rows: int, device: str,
                       progress: Callable[[str], None] | None = None) -> tuple[dict, dict, dict]:
    """(scalar metrics, per-latent `feature_density` and `consistent_activation_heuristic`, counts) of
    the SAE on the split's cached rows whose token is not in `special`, streamed chunk by chunk.

    Two passes: the first takes the mean of the reconstructed hook's rows, which the legacy
    explained variance subtracts from each row (SAEBench: its batch's mean)."""
    hooks = list(dict.fromkeys([hook, hook_out]))
    special_t = torch.tensor(sorted(special), dtype=torch.long, device=device)
    total, n = torch.zeros(sae.d_out, dtype=torch.float64, device=device), 0
    split_rows = min(sum(s["rows"] for s in cache.shards(split)), max_rows or math.inf)
    say = progress or (lambda text: None)
    for _, acts, tok in split_chunks(cache, hooks, split, chunk_rows, max_rows):
        x = acts[-1].to(device=device, dtype=torch.float64)[_plain_rows(tok, special_t, len(acts[-1]), device)]
        total += x.sum(0)
        n += len(x)
        say(f"eval: activation metrics, pass 1 of 2: the mean of {n:,}/{split_rows:,} rows")
    if n == 0:
        raise PipelineError(f"cache {cache.path} has no {split!r} rows of non-special tokens to evaluate on; "
                            "pass --split train")
    mu = (total / n).float()

    s = _sums(sae.d_sae, sae.d_out, device)
    read, chunks, last_shard, keys = 0, 0, None, []

    def count_prompts() -> None:
        """Per latent, the sequences of the finished shard it fires in (a shard holds whole sequences)."""
        if keys:
            s["prompts"] += torch.bincount(torch.unique(torch.cat(keys)) % sae.d_sae, minlength=sae.d_sae)
            keys.clear()

    for shard, acts, tok in split_chunks(cache, hooks, split, chunk_rows, max_rows):
        keep = _plain_rows(tok, special_t, len(acts[0]), device)
        x_in = acts[0].to(device=device, dtype=torch.float32)[keep]
        x = acts[-1].to(device=device, dtype=torch.float32)[keep]
        read += len(acts[0])
        chunks += 1
        say(f"eval: activation metrics, pass 2 of 2: {read:,}/{split_rows:,} rows ({read / split_rows:.0%})")
        if shard != last_shard:
            count_prompts()
            last_shard = shard
        lat = sae.encode(x_in)
        xh = sae.model.decode(lat.unsqueeze(0), x_in)[0]
        resid = (x - xh).pow(2).sum(-1)
        n_in, n_out = x.norm(dim=-1), xh.norm(dim=-1)
        # As SAEBench: tiny input norms divide by 1; cosine is NaN where a norm is 0 (SAEBench's -1).
        ratio = n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)
        cos = ((x / n_in.unsqueeze(-1)) * (xh / n_out.unsqueeze(-1))).sum(-1)
        legacy = 1 - resid / (x - mu).pow(2).sum(-1)
        for key, val in (("norm_in", n_in), ("norm_out", n_out), ("ratio", ratio), ("out_sq", n_out.pow(2)),
                         ("dot", (x * xh).sum(-1)), ("l0", (lat != 0).sum(-1)), ("l1", lat.sum(-1)),
                         ("resid", resid), ("x_sq", x.pow(2).sum(-1)), ("legacy", legacy), ("cos", cos)):
            s[key] += val.double().sum()
        s["x"] += x.double().sum(0)
        fired = lat > 0
        s["fired"] += fired.sum(0)
        if tok is not None:
            rows, cols = fired.nonzero(as_tuple=True)
            keys.append(torch.unique(tok[:, 1].to(device)[keep][rows] * sae.d_sae + cols))
    count_prompts()

    m = {k: float(v) / n for k, v in s.items() if v.ndim == 0}
    mean_x = s["x"] / n
    total_var = m["x_sq"] - float(mean_x.pow(2).sum())
    # SAEBench 0.6.0's code: E||x||^2 - (mean over dimensions of E[x_d^2])^2, variance about zero.
    var_about_zero = m["x_sq"] - (m["x_sq"] / sae.d_out) ** 2
    scalars = {
        "explained_variance": 1 - m["resid"] / total_var if total_var > 0 else math.nan,
        "explained_variance_legacy": m["legacy"], "mse": m["resid"], "cossim": m["cos"],
        "l2_norm_in": m["norm_in"], "l2_norm_out": m["norm_out"], "l2_ratio": m["ratio"],
        "relative_reconstruction_bias": m["out_sq"] / m["dot"] if m["dot"] != 0 else math.nan,
        "l0": m["l0"], "l1": m["l1"],
        "explained_variance_saebench_0_6_0": 1 - m["resid"] / var_about_zero if var_about_zero > 0 else math.nan,
    }
    fired = s["fired"].double().cpu()
    prompts = s["prompts"].double().cpu()
    per_latent = {"feature_density": (fired / n).tolist(),
                  "consistent_activation_heuristic": (fired / prompts).tolist() if tok is not None
                  else [math.nan] * sae.d_sae}
    return scalars, per_latent, {"rows": n, "rows_read": read, "special_rows_left_out": read - n, "chunks": chunks}


# ------------------------------------------------------------------------------ weight metrics


def max_cosine_sim(W: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(F,) the largest cosine similarity of each column of W (D, F) with any other column, without
    an (F, F) matrix."""
    unit = torch.nn.functional.normalize(W.float(), dim=0)
    out = torch.empty(W.shape[1], device=W.device)
    for start in range(0, W.shape[1], chunk):
        sims = unit[:, start:start + chunk].T @ unit
        idx = torch.arange(sims.shape[0], device=W.device)
        sims[idx, start + idx] = -math.inf
        out[start:start + chunk] = sims.max(dim=1).values
    return out


@torch.no_grad()
def weight_metrics(sae: LoadedSAE) -> dict[str, list[float]]:
    """Per latent, from the weights as SAELens names them: encoder bias (a gated SAE's b_mag, as
    SAEBench), encoder norm, cosine of its encoder column and decoder row, max cosines with others."""
    w, _ = sae.model.export_run(0)
    W_enc, W_dec = w["W_enc"].float(), w["W_dec"].float()
    bias = w["b_mag"] if sae.architecture == "gated" else w.get("b_enc", torch.zeros(sae.d_sae))
    enc_dec = (torch.nn.functional.cosine_similarity(W_enc.T, W_dec, dim=-1) if W_enc.shape[0] == W_dec.shape[1]
               else torch.full((sae.d_sae,), math.nan))  # a transcoder's decoder lives in another space
    return {"encoder_bias": bias.float().tolist(), "encoder_norm": W_enc.norm(dim=0).tolist(),
            "encoder_decoder_cosine_sim": enc_dec.tolist(),
            "max_encoder_cosine_sim": max_cosine_sim(W_enc).tolist(),
            "max_decoder_cosine_sim": max_cosine_sim(W_dec.T).tolist()}


def misc_metrics(per_latent: dict[str, list[float]]) -> dict[str, float]:
    """SAEBench's calculate_misc_metrics: the density thresholds and the mean max cosines."""
    density = torch.tensor(per_latent["feature_density"], dtype=torch.float64)
    total = float(density.sum())
    return {
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
        "normalized_freq_over_1_percent": float(density[density > 0.01].sum()) / total if total > 0 else 0.0,
        "normalized_freq_over_10_percent": float(density[density > 0.1].sum()) / total if total > 0 else 0.0,
        "average_max_encoder_cosine_sim": float(torch.tensor(per_latent["max_encoder_cosine_sim"]).mean()),
        "average_max_decoder_cosine_sim": float(torch.tensor(per_latent["max_decoder_cosine_sim"]).mean()),
        "frac_alive": float((density > 0).double().mean()),
    }


# ------------------------------------------------------------------------------ the output


def nan_to_minus_one(obj: Any) -> Any:
    """SAEBench's replace_nans_with_negative_one: NaN (a metric that could not be computed) is -1."""
    if isinstance(obj, dict):
        return {k: nan_to_minus_one(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_minus_one(v) for v in obj]
    return -1 if isinstance(obj, float) and math.isnan(obj) else obj


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def model_metrics(bench: dict | None) -> dict[str, dict[str, float]]:
    """The two spliced-model categories from `evaluate_ce`'s `saebench` block (NaN without a model)."""
    if bench is None:
        return {c: {f: math.nan for f in CATEGORIES[c]} for c in MODEL_CATEGORIES}
    kl_sae, kl_abl = bench["kl_div_with_sae"], bench["kl_div_with_ablation"]
    ce_sae, ce_abl, ce = bench["ce_loss_with_sae"], bench["ce_loss_with_ablation"], bench["ce_loss_without_sae"]
    return {"model_behavior_preservation": {"kl_div_score": _ratio(kl_abl - kl_sae, kl_abl),
                                            "kl_div_with_ablation": kl_abl, "kl_div_with_sae": kl_sae},
            "model_performance_preservation": {"ce_loss_score": _ratio(ce_abl - ce_sae, ce_abl - ce),
                                               "ce_loss_with_ablation": ce_abl, "ce_loss_with_sae": ce_sae,
                                               "ce_loss_without_sae": ce}}


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-cache-pipeline")
    except PackageNotFoundError:
        return "unknown"


def _saelens_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return None


@torch.no_grad()
def core_eval(cfg: EvalConfig, adapter: Any = None, sae: LoadedSAE | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """SAEBench's core output (a dict shaped as its CoreEvalOutput JSON) for the SAE on the cache;
    `eval_result_unstructured` holds `pipeline_eval` (`evaluate_ce`'s results) and what differs.
    `progress` hears how far the passes are."""
    from analysis.report import cache_tokenizer, default_chunk_rows

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    cache = Cache(cfg.cache)
    sae = sae or load_sae(cfg.sae, device)
    hook = resolve_hook(cache, sae, cfg.hook)
    hook_out = output_hook(cache, sae, hook)
    no_model = None if adapter is not None else model_unavailable(cache, cfg.model)
    ce = None if no_model else evaluate_ce(replace(cfg, saebench=True), adapter=adapter, sae=sae, progress=progress)
    special = special_token_ids(cache, cache_tokenizer(cache))
    scalars, per_latent, counts = activation_metrics(cache, sae, hook, hook_out, cfg.split, special, cfg.max_rows,
                                                     default_chunk_rows(sae.d_sae), device, progress)
    per_latent.update(weight_metrics(sae))
    bench = ce.pop("saebench") if ce else None
    if ce:  # what SAEBench's CE averages over, for the screen to say beside it
        ce["saebench_predictions"] = bench["predictions"]
    metrics = model_metrics(bench)
    metrics["reconstruction_quality"] = {k: scalars[k] for k in CATEGORIES["reconstruction_quality"]}
    metrics["shrinkage"] = {k: scalars[k] for k in CATEGORIES["shrinkage"]}
    metrics["sparsity"] = {k: scalars[k] for k in CATEGORIES["sparsity"]}
    metrics["token_stats"] = {"total_tokens_eval_reconstruction": bench["tokens"] if bench else 0,
                              "total_tokens_eval_sparsity_variance": counts["rows"]}
    metrics["misc_metrics"] = misc_metrics(per_latent)
    metrics = {c: metrics[c] for c in CATEGORIES}
    details = [{"index": i, **{f: round(per_latent[f][i], FLOAT_PRECISION) if not math.isnan(per_latent[f][i])
                               else math.nan for f in DETAIL_FIELDS[1:]}} for i in range(sae.d_sae)]
    prov = cache.manifest.get("provenance") or {}
    model_info = prov.get("model") or {}
    source = (cache.manifest.get("config") or {}).get("source") or {}
    batches = math.ceil(ce["contexts"] / cfg.batch_size) if ce else 0
    out = {
        "eval_type_id": "core",
        "eval_config": {
            "model_name": ce["model"] if ce else model_info.get("name", ""),
            "llm_dtype": model_info.get("dtype") or "float32", "batch_size_prompts": cfg.batch_size,
            "n_eval_reconstruction_batches": batches, "n_eval_sparsity_variance_batches": counts["chunks"],
            "dataset": str((prov.get("dataset") or {}).get("name") or ""),
            "context_size": int(cache.manifest.get("context_size") or 0),
            "compute_kl": ce is not None, "compute_ce_loss": ce is not None, "compute_l2_norms": True,
            "compute_sparsity_metrics": True, "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True, "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": bool(source.get("exclude_special_tokens", True)),
            "verbose": False,
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": f"none: sae-cache-pipeline {_package_version()}, SAEBench {SAEBENCH_VERSION}'s "
                                 "core definitions (docs/METRICS.md)",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": _saelens_version(),
        "sae_cfg_dict": sae.cfg,
        "eval_result_unstructured": {
            "saebench_version": SAEBENCH_VERSION, "sae": str(sae.path), "cache": str(cache.path), "split": cfg.split,
            "hook": hook, **({"hook_out": hook_out} if hook_out != hook else {}),
            "rows_read": counts["rows_read"], "special_rows_left_out": counts["special_rows_left_out"],
            "explained_variance_saebench_0_6_0": scalars["explained_variance_saebench_0_6_0"],
            "not_computed": {c: f"the cache {no_model}" for c in MODEL_CATEGORIES} if no_model else {},
            "pipeline_eval": ce,
        },
    }
    return nan_to_minus_one(out)


# ------------------------------------------------------------------------------ the command

def print_core(res: dict) -> None:
    """The core metrics as a rich table, category by category; the spliced-model ones where they
    were computed are shown beside `pipeline eval`'s own (print_results), not here again."""
    from rich.table import Table

    from pipeline.console import log_console

    console = log_console()
    un = res["eval_result_unstructured"]
    beside = "; KL and CE: the SAEBench column above" if un["pipeline_eval"] else ""
    table = Table(title=f"SAEBench {un['saebench_version']} core metrics on the cached rows ({un['split']} split: "
                        f"{res['eval_result_metrics']['token_stats']['total_tokens_eval_sparsity_variance']:,} rows"
                        f"{beside})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for cat, fields in res["eval_result_metrics"].items():
        if cat in MODEL_CATEGORIES and un["pipeline_eval"]:
            continue
        table.add_row(f"[bold]{cat}[/bold]", "" if cat not in un["not_computed"] else "(not computed)")
        if cat in un["not_computed"]:
            continue
        for name, value in fields.items():
            table.add_row(f"  {name}", f"{value:,}" if isinstance(value, int) else f"{value:.5g}")
    console.print(table)
    for cat, why in un["not_computed"].items():
        console.print(f"note: {cat.replace('_', ' ')} not computed: {why}", highlight=False, soft_wrap=True)


def run_eval(cfg: EvalConfig) -> dict:
    """`pipeline eval`: the core metrics (and, where the cache has a model, CE loss recovered and KL),
    printed; written as SAEBench's core JSON to `cfg.out`."""
    status = Status(f"eval: loading {cfg.sae} and the model of {cfg.cache}")
    with Heartbeat(status.line):  # minutes of forward passes otherwise print nothing
        res = core_eval(cfg, progress=status.set)
    if res["eval_result_unstructured"]["pipeline_eval"]:
        metrics = res["eval_result_metrics"]
        print_results(res["eval_result_unstructured"]["pipeline_eval"],
                      {k: v for c in MODEL_CATEGORIES for k, v in metrics[c].items()})
    print_core(res)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(res, indent=2))
    return res
