"""`pipeline eval`'s SAEBench core metrics: every metric against an independent formula written here,
and the output JSON against SAEBench's core schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.core_metrics import core_eval, run_eval
from analysis.evaluate_ce import EvalConfig
from cache_writer.run import CacheConfig, run_cache
from pipeline.reader import Cache
from tests.builders import small_corpus
from trainer.export import export_saelens
from trainer.sae_standard import StandardConfig, StandardSAE

HOOK = "blocks.0.hook_resid_post"
BOS = 256  # the byte tokenizer's BOS, the only special token of the tiny model's caches

# SAEBench's core output, written out from its source: sae-bench 0.6.0 (PyPI),
# sae_bench/evals/core/eval_output.py (CoreEvalOutput, CoreMetricCategories, CoreFeatureMetric),
# sae_bench/evals/core/eval_config.py (CoreEvalConfig), sae_bench/evals/base_eval_output.py
# (BaseEvalOutput), in their field order (pydantic dataclasses, dumped with dataclasses.asdict).
SAEBENCH_VERSION = "0.6.0"
SAEBENCH_CORE_SCHEMA = {
    "top": ["eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
            "eval_result_details", "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id", "sae_lens_version",
            "sae_cfg_dict", "eval_result_unstructured"],
    "eval_config": ["model_name", "llm_dtype", "batch_size_prompts", "n_eval_reconstruction_batches",
                    "n_eval_sparsity_variance_batches", "dataset", "context_size", "compute_kl", "compute_ce_loss",
                    "compute_l2_norms", "compute_sparsity_metrics", "compute_variance_metrics",
                    "compute_featurewise_density_statistics", "compute_featurewise_weight_based_metrics",
                    "exclude_special_tokens_from_reconstruction", "verbose"],
    "eval_result_metrics": {
        "model_behavior_preservation": ["kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"],
        "model_performance_preservation": ["ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                           "ce_loss_without_sae"],
        "reconstruction_quality": ["explained_variance", "explained_variance_legacy", "mse", "cossim"],
        "shrinkage": ["l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"],
        "sparsity": ["l0", "l1"],
        "token_stats": ["total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"],
        "misc_metrics": ["freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                         "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                         "average_max_decoder_cosine_sim", "frac_alive"],
    },
    "eval_result_details": ["index", "feature_density", "consistent_activation_heuristic", "encoder_bias",
                            "encoder_norm", "encoder_decoder_cosine_sim", "max_decoder_cosine_sim",
                            "max_encoder_cosine_sim"],
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """The tiny model over small stdlib documents: one cache without rows for BOS (the default), one
    with them; the same documents, splits and contexts."""
    root = tmp_path_factory.mktemp("core")
    torch.set_num_threads(1)
    docs = small_corpus(root / "docs")
    out = {}
    for name, exclude in (("plain", True), ("with_bos", False)):
        run_cache(CacheConfig(out=str(root / name), dataset=docs, tokens=6000, context_size=64, eval_fraction=0.3,
                              hooks=[HOOK], exclude_special_tokens=exclude), progress=False)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    """A standard (ReLU) SAE with random weights and biases: some latents fire often, some rarely."""
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 128, 96
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.08, "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.1,
         "b_enc": torch.randn(d_sae, generator=g) * 0.5 - 0.6, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    w["b_enc"][:8] = -100.0  # dead
    w["b_enc"][8:16] = -1.6  # rare
    model = StandardSAE([StandardConfig(d_in=d_in, d_sae=d_sae)])
    model.load_run(0, w, {})
    return export_saelens(model, 0, tmp_path_factory.mktemp("sae") / "sae", {"hook_name": HOOK})


def _weights(sae: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(sae / "sae_weights.safetensors")).items()}


def _eval_rows(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every cached eval row of the hook (float64) and its token row (token, sequence, position)."""
    c = Cache(cache)
    x = np.concatenate([c.activations_tensor(HOOK, "eval", i).double().numpy() for i in range(len(c.shards("eval")))])
    tok = np.concatenate([np.asarray(c.tokens("eval", i)) for i in range(len(c.shards("eval")))]).astype(np.int64)
    return x, tok


def _max_cos(W: np.ndarray) -> np.ndarray:
    """Largest cosine of each column with another, from the full matrix."""
    unit = W / np.linalg.norm(W, axis=0, keepdims=True)
    sims = unit.T @ unit
    np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1)


def expected_activation_metrics(cache: Path, sae: Path) -> tuple[dict, dict]:
    w = _weights(sae)
    x, tok = _eval_rows(cache)
    keep = tok[:, 0] != BOS
    x, tok = x[keep], tok[keep]
    f = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    xh = f @ w["W_dec"] + w["b_dec"]
    r = ((x - xh) ** 2).sum(1)
    n_in, n_out = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    fired = f > 0
    density = fired.mean(0)
    prompts = np.array([len(np.unique(tok[fired[:, j], 1])) for j in range(f.shape[1])])
    enc_unit = w["W_enc"] / np.linalg.norm(w["W_enc"], axis=0)
    dec_unit = w["W_dec"] / np.linalg.norm(w["W_dec"], axis=1, keepdims=True)
    scalars = {
        "explained_variance": 1 - r.mean() / x.var(axis=0).sum(),
        "explained_variance_legacy": (1 - r / ((x - x.mean(0)) ** 2).sum(1)).mean(),
        "mse": r.mean(), "cossim": ((x * xh).sum(1) / (n_in * n_out)).mean(),
        "l2_norm_in": n_in.mean(), "l2_norm_out": n_out.mean(), "l2_ratio": (n_out / n_in).mean(),
        "relative_reconstruction_bias": (n_out ** 2).mean() / (x * xh).sum(1).mean(),
        "l0": fired.sum(1).mean(), "l1": f.sum(1).mean(),
        "freq_over_1_percent": (density > 0.01).mean(), "freq_over_10_percent": (density > 0.1).mean(),
        "normalized_freq_over_1_percent": density[density > 0.01].sum() / density.sum(),
        "normalized_freq_over_10_percent": density[density > 0.1].sum() / density.sum(),
        "average_max_encoder_cosine_sim": _max_cos(w["W_enc"]).mean(),
        "average_max_decoder_cosine_sim": _max_cos(w["W_dec"].T).mean(),
        "frac_alive": (density > 0).mean(),
        "total_tokens_eval_sparsity_variance": len(x),
    }
    details = {"feature_density": density,
               "consistent_activation_heuristic": np.where(prompts > 0, fired.sum(0) / np.maximum(prompts, 1), -1),
               "encoder_bias": w["b_enc"], "encoder_norm": np.linalg.norm(w["W_enc"], axis=0),
               "encoder_decoder_cosine_sim": (enc_unit.T * dec_unit).sum(1),
               "max_decoder_cosine_sim": _max_cos(w["W_dec"].T), "max_encoder_cosine_sim": _max_cos(w["W_enc"])}
    return scalars, details


def expected_model_metrics(cache: Path, sae: Path, contexts: int) -> dict:
    """SAEBench's get_recons_loss and its averaging, by hand: the SAE at the positions with cached
    rows, the hook zero at every position, CE and KL averaged where the token is not BOS."""
    from cache_writer.tiny_model import load_tiny_model

    w = {k: torch.from_numpy(v) for k, v in _weights(sae).items()}
    c = Cache(cache)
    tokens = torch.from_numpy(np.concatenate([np.asarray(c.sequences("eval", i)) for i in range(len(c.shards("eval")))])
                              [:contexts].astype(np.int64))
    plain = tokens != BOS
    model = load_tiny_model()

    def sae_hook(act, hook):
        f = torch.relu((act.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        return torch.where(plain.unsqueeze(-1), (f @ w["W_dec"] + w["b_dec"]).to(act.dtype), act)

    with torch.no_grad():
        logits = {"clean": model(tokens), "sae": model.run_with_hooks(tokens, fwd_hooks=[(HOOK, sae_hook)]),
                  "zero": model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: torch.zeros_like(act))])}
    lp = {k: v.double().log_softmax(-1) for k, v in logits.items()}
    ce = {k: -v[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0][plain[:, :-1]].mean().item() for k, v in lp.items()}
    kl = {k: (lp["clean"].exp() * (lp["clean"] - lp[k])).sum(-1)[plain].mean().item() for k in ("sae", "zero")}
    return {"kl_div_score": (kl["zero"] - kl["sae"]) / kl["zero"], "kl_div_with_ablation": kl["zero"],
            "kl_div_with_sae": kl["sae"], "ce_loss_score": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
            "ce_loss_with_ablation": ce["zero"], "ce_loss_with_sae": ce["sae"], "ce_loss_without_sae": ce["clean"],
            "total_tokens_eval_reconstruction": tokens.numel()}


def _flat(res: dict) -> dict:
    return {k: v for cat in res["eval_result_metrics"].values() for k, v in cat.items()}


def test_every_core_metric_equals_an_independent_formula(caches, sae_dir, tmp_path):
    out = tmp_path / "core.json"
    res = run_eval(EvalConfig(sae=str(sae_dir), cache=str(caches["plain"]), contexts=6, batch_size=4, device="cpu",
                              out=str(out)))
    got = _flat(res)
    scalars, details = expected_activation_metrics(caches["plain"], sae_dir)
    model = expected_model_metrics(caches["plain"], sae_dir, 6)
    for name, want in {**scalars, **model}.items():
        assert got[name] == pytest.approx(want, rel=1e-4, abs=1e-6), name
    assert 0 < got["frac_alive"] < 1 and 0 < got["freq_over_1_percent"] < 1  # the thresholds are exercised
    assert got["ce_loss_with_ablation"] > got["ce_loss_with_sae"] > got["ce_loss_without_sae"]
    rows = res["eval_result_details"]
    assert [r["index"] for r in rows] == list(range(96))
    for name, want in details.items():
        np.testing.assert_allclose([r[name] for r in rows], want, rtol=1e-4, atol=1e-6, err_msg=name)
    assert json.loads(out.read_text()) == res
    # The CE/KL numbers of `pipeline eval` ride along, unstructured.
    pe = res["eval_result_unstructured"]["pipeline_eval"]
    assert pe["contexts"] == 6 and 0 < pe["ce_recovered_zero"] < 1 and "saebench" not in pe


def test_json_has_saebench_core_schema(caches, sae_dir, tmp_path):
    out = tmp_path / "core.json"
    run_eval(EvalConfig(sae=str(sae_dir), cache=str(caches["plain"]), contexts=2, device="cpu", max_rows=500,
                        out=str(out)))
    res = json.loads(out.read_text())
    assert list(res) == SAEBENCH_CORE_SCHEMA["top"]
    assert list(res["eval_config"]) == SAEBENCH_CORE_SCHEMA["eval_config"]
    assert {c: list(f) for c, f in res["eval_result_metrics"].items()} == SAEBENCH_CORE_SCHEMA["eval_result_metrics"]
    assert all(list(r) == SAEBENCH_CORE_SCHEMA["eval_result_details"] for r in res["eval_result_details"])
    assert res["eval_type_id"] == "core" and res["eval_result_unstructured"]["saebench_version"] == SAEBENCH_VERSION
    assert res["eval_result_metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"] <= 500
    assert res["sae_cfg_dict"]["metadata"]["hook_name"] == HOOK
    types = {"int": int, "float": (float, int), "str": str, "bool": bool}
    for key, kind in (("batch_size_prompts", "int"), ("context_size", "int"), ("dataset", "str"),
                      ("compute_kl", "bool"), ("model_name", "str")):
        assert isinstance(res["eval_config"][key], types[kind]), key
    assert all(isinstance(v, (int, float)) for v in _flat(res).values())


def test_eval_says_how_far_its_passes_are(caches, sae_dir, capsys):
    """`pipeline eval` ran for minutes without a line: a heartbeat prints what `progress` last heard."""
    heard = []
    core_eval(EvalConfig(sae=str(sae_dir), cache=str(caches["plain"]), contexts=4, batch_size=2, device="cpu",
                         max_rows=500), progress=heard.append)
    assert heard[:2] == ["eval: CE loss and KL: 2/4 contexts (50%)", "eval: CE loss and KL: 4/4 contexts (100%)"]
    assert heard[-1] == "eval: activation metrics, pass 2 of 2: 500/500 rows (100%)"
    run_eval(EvalConfig(sae=str(sae_dir), cache=str(caches["plain"]), contexts=2, device="cpu", max_rows=500))
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"eval: loading {sae_dir} and the model of {caches['plain']} (0:00 in)"


def test_special_token_rows_are_left_out_as_saebench_masks_them(caches, sae_dir):
    """A cache that stores BOS rows gives the same activation metrics (BOS rows left out), and the
    same clean and everywhere-ablated CE (its contexts are the same)."""
    base = dict(sae=str(sae_dir), contexts=4, device="cpu")
    plain = core_eval(EvalConfig(cache=str(caches["plain"]), **base))
    bos = core_eval(EvalConfig(cache=str(caches["with_bos"]), **base))
    assert bos["eval_result_unstructured"]["special_rows_left_out"] > 0
    assert plain["eval_result_unstructured"]["special_rows_left_out"] == 0
    a, b = _flat(plain), _flat(bos)
    for name in ("explained_variance", "mse", "cossim", "l0", "l1", "l2_ratio", "frac_alive",
                 "total_tokens_eval_sparsity_variance", "ce_loss_without_sae", "ce_loss_with_ablation",
                 "kl_div_with_ablation"):
        assert a[name] == pytest.approx(b[name], rel=1e-5), name
    assert not bos["eval_config"]["exclude_special_tokens_from_reconstruction"]


def test_cache_without_a_model_gets_the_activation_metrics(tmp_path):
    """Synthetic activations: no model to splice into. The model categories are SAEBench's -1 (its
    value for NaN) and the reason is given; the rest is computed, across several shards."""
    from tests.synthetic import HOOKS, write_synthetic

    write_synthetic(tmp_path / "c", n_steps=12)
    hook, d = next(iter(HOOKS.items()))
    model = StandardSAE([StandardConfig(d_in=d, d_sae=24, seed=3)])
    sae = export_saelens(model, 0, tmp_path / "sae", {"hook_name": hook})
    assert len(Cache(tmp_path / "c").shards("eval")) > 1
    res = core_eval(EvalConfig(sae=str(sae), cache=str(tmp_path / "c"), device="cpu"))
    for cat in ("model_behavior_preservation", "model_performance_preservation"):
        assert set(res["eval_result_metrics"][cat].values()) == {-1}
        assert "records no model" in res["eval_result_unstructured"]["not_computed"][cat]
    got = _flat(res)
    assert got["l0"] > 0 and -1 < got["explained_variance"] < 1 and got["total_tokens_eval_reconstruction"] == 0
    assert res["eval_result_unstructured"]["pipeline_eval"] is None
    cah = [r["consistent_activation_heuristic"] for r in res["eval_result_details"]]
    assert all(v == -1 or v >= 1 for v in cah) and any(v >= 1 for v in cah)
    assert not math.isnan(got["average_max_decoder_cosine_sim"])


def test_eval_prints_each_ce_once_beside_saebench_s_with_what_each_averages(caches, sae_dir, capsys):
    """Two tables printed `CE clean 1.7567` and `ce_loss_without_sae 1.7224` apart, a contradiction to
    a reader: now one row per measure, ours and SAEBench's side by side, each column saying which
    predictions it averages, and the core table does not repeat them."""
    capsys.readouterr()
    res = run_eval(EvalConfig(sae=str(sae_dir), cache=str(caches["plain"]), contexts=4, device="cpu", max_rows=500))
    out = capsys.readouterr().out
    ours = res["eval_result_unstructured"]["pipeline_eval"]
    bench = res["eval_result_metrics"]["model_performance_preservation"]
    clean, without = f"{ours['ce_clean']:.4f}", f"{bench['ce_loss_without_sae']:.4f}"
    assert clean != without  # the predictions at BOS: counted in ours, left out of SAEBench's
    rows = [line for line in out.splitlines() if clean in line or without in line]
    assert len(rows) == 1 and "CE clean" in rows[0] and "ce_loss_without_sae" in rows[0], out
    assert rows[0].index(clean) < rows[0].index(without)
    assert f"all {ours['predictions']:,} predictions" in out
    assert f"SAEBench: the {ours['saebench_predictions']:,} at non-special tokens" in out
    assert ours["saebench_predictions"] < ours["predictions"]
    assert "leaves out the predictions made at special tokens" in out
    for field in ("ce_loss_with_sae", "kl_div_with_sae", "kl_div_score"):
        assert sum(field in line for line in out.splitlines()) == 1, field  # not again in the core table
    assert "model_performance_preservation" not in out and "reconstruction_quality" in out
