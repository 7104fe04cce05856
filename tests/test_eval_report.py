"""`pipeline eval` (CE loss recovered, KL) and `pipeline report` (static HTML) on a tiny cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_writer.run import CacheConfig, run_cache
from pipeline.errors import PipelineError
from analysis.evaluate_ce import EvalConfig, evaluate_ce
from trainer.export import export_saelens
from analysis.inference import load_sae
from analysis.report import ReportConfig, best_per_sequence, build_report, new_stats, update_stats
from tests.builders import HTMLDom, chromium, relu_sae, small_corpus, tiny_opt

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The shipped tiny model over small stdlib documents, 30% of them held out (in pieces) as eval."""
    root = tmp_path_factory.mktemp("eval")
    torch.set_num_threads(1)
    run_cache(CacheConfig(out=str(root / "c"), dataset=small_corpus(root / "docs"), tokens=8000, context_size=64,
                          eval_fraction=0.3, hooks=[HOOK]), progress=False)
    return root / "c"


def exact_sae(out: Path, d: int, hook: str = HOOK) -> Path:
    """ReLU(x) - ReLU(-x) = x: W_enc = [I, -I], W_dec = [I; -I] reconstructs every input exactly."""
    eye = torch.eye(d)
    return relu_sae(out, torch.cat([eye, -eye], dim=1), torch.cat([eye, -eye], dim=0), hook)


def zero_sae(out: Path, d: int, hook: str = HOOK) -> Path:
    return relu_sae(out, torch.zeros(d, 2 * d), torch.zeros(2 * d, d), hook)


def test_exact_sae_recovers_everything_and_zero_sae_nothing(cache, tmp_path):
    exact = evaluate_ce(EvalConfig(sae=str(exact_sae(tmp_path / "exact", 128)), cache=str(cache), contexts=8))
    assert exact["ce_zero_ablation"] > exact["ce_mean_ablation"] > exact["ce_clean"] + 0.1
    assert exact["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert exact["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert exact["ce_recovered_zero_meaningful"] and exact["ce_recovered_zero_note"] is None
    assert abs(exact["kl_spliced"]) < 1e-5 and exact["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert exact["contexts"] == 8 and exact["predictions"] == 8 * 63
    # BOS and separators have no cached rows: they are not replaced.
    assert 0 < exact["spliced_positions"] < 8 * 64

    zero = evaluate_ce(EvalConfig(sae=str(zero_sae(tmp_path / "zero", 128)), cache=str(cache), contexts=8))
    assert zero["ce_recovered_zero"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero_ablation"], abs=1e-6)
    assert zero["kl_spliced"] == pytest.approx(zero["kl_zero_ablation"], rel=1e-6)
    assert zero["ce_recovered_mean"] < 0  # zeroing the residual stream is worse than its mean


def test_hugging_face_module_hook(tmp_path):
    """A Hugging Face model: the SAE goes in through a torch forward hook on the module path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    run_cache(CacheConfig(out=str(tmp_path / "c"), model=str(tmp_path / "gpt2"), tokenizer="bytes",
                          hooks=["transformer.h.0"], context_size=32, tokens=2000, eval_fraction=0.5), progress=False)
    base = dict(cache=str(tmp_path / "c"), contexts=4, device="cpu")
    exact = evaluate_ce(EvalConfig(sae=str(exact_sae(tmp_path / "exact", 32, "transformer.h.0")), **base))
    assert exact["ce_spliced"] == pytest.approx(exact["ce_clean"], abs=1e-5) and abs(exact["kl_spliced"]) < 1e-6
    assert exact["ce_zero_ablation"] != pytest.approx(exact["ce_clean"], abs=1e-5)  # the hook did replace
    zero = evaluate_ce(EvalConfig(sae=str(zero_sae(tmp_path / "zero", 32, "transformer.h.0")), **base))
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero_ablation"], abs=1e-6)


def test_ce_recovered_is_flagged_when_the_ablation_barely_changes_the_loss(tmp_path, capsys):
    """A random-weights model barely depends on any one hook: the ratio divides by almost nothing,
    and eval says so (printed and in its JSON) instead of printing a number like -28.9 bare."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from analysis.core_metrics import run_eval
    from analysis.evaluate_ce import ce_recovered, print_results

    assert ce_recovered(2.0, 2.1, 3.0) == (pytest.approx(0.9), None)
    score, note = ce_recovered(2.0, 2.5, 2.01)  # +0.01 nats: under 1% of the clean CE
    assert score == pytest.approx(-49.0) and "1% of the clean CE" in note
    assert ce_recovered(0.05, 0.05, 0.0505)[1] is not None  # under the absolute floor
    assert ce_recovered(2.0, 2.0, 1.9)[1] is not None  # ablation helps: no ratio to speak of

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    run_cache(CacheConfig(out=str(tmp_path / "c"), model=str(tmp_path / "gpt2"), tokenizer="bytes",
                          hooks=["transformer.h.0"], context_size=32, tokens=2000, eval_fraction=0.5), progress=False)
    run_eval(EvalConfig(sae=str(zero_sae(tmp_path / "zero", 32, "transformer.h.0")), cache=str(tmp_path / "c"),
                        contexts=4, device="cpu", out=str(tmp_path / "eval.json")))
    saved = json.loads((tmp_path / "eval.json").read_text())["eval_result_unstructured"]["pipeline_eval"]
    res = saved
    assert abs(res["ce_zero_ablation"] - res["ce_clean"]) < 0.01 * res["ce_clean"]
    for ablation in ("zero", "mean"):
        assert saved[f"ce_recovered_{ablation}_meaningful"] is False
        assert "divides by almost nothing" in saved[f"ce_recovered_{ablation}_note"]
    capsys.readouterr()
    print_results(res)
    out = capsys.readouterr().out
    assert "(not meaningful)" in out
    assert "note: CE loss recovered (zero) is not meaningful: zero ablation changes" in out


def test_module_with_flattened_tokens_is_spliced(tmp_path):
    """OPT's fc2 sees the tokens flattened (batch * seq, d): the SAE still replaces the right rows."""
    hook = "model.decoder.layers.1.fc2"
    run_cache(CacheConfig(out=str(tmp_path / "c"), model=str(tiny_opt(tmp_path / "opt")), tokenizer="bytes",
                          hooks=[hook], context_size=32, tokens=2000, eval_fraction=0.5), progress=False)
    base = dict(cache=str(tmp_path / "c"), contexts=4, device="cpu")
    exact = evaluate_ce(EvalConfig(sae=str(exact_sae(tmp_path / "exact", 32, hook)), **base))
    assert exact["ce_spliced"] == pytest.approx(exact["ce_clean"], abs=1e-5) and abs(exact["kl_spliced"]) < 1e-6
    assert exact["ce_zero_ablation"] != pytest.approx(exact["ce_clean"], abs=1e-5)


def test_model_held_in_memory_is_passed_to_evaluation(tmp_path):
    """A HookedTransformer built from its config caches through the Python API and evaluates the same way."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from cache_writer.model_adapter import adapter_from_hooked_transformer

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=64, d_head=8, n_heads=4,
                                                      d_mlp=64, d_vocab=257, act_fn="gelu")).eval()
    run_cache(CacheConfig(out=str(tmp_path / "c"), tokenizer="bytes", hooks=[HOOK], context_size=32, tokens=2000,
                          eval_fraction=0.3), adapter=adapter_from_hooked_transformer(model, "mine"), progress=False)
    cfg = dict(sae=str(exact_sae(tmp_path / "exact", 32)), cache=str(tmp_path / "c"), contexts=4, device="cpu")
    with pytest.raises(PipelineError, match=r"held in memory \(mine\); pass --model, or from Python the model "
                                            r"itself: EvalConfig\(model=model\)"):
        evaluate_ce(EvalConfig(**cfg))
    exact = evaluate_ce(EvalConfig(**cfg, model=model))
    assert exact["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4) and exact["model"] == "mine"
    assert exact["ce_zero_ablation"] != pytest.approx(exact["ce_clean"], abs=1e-5)  # the hook did replace


def test_eval_refuses_non_positive_sizes(cache, tmp_path):
    with pytest.raises(PipelineError, match=r"--contexts must be a number > 0, got 0"):
        EvalConfig(sae=str(tmp_path), cache=str(cache), contexts=0)


def test_running_topk_equals_a_sort_of_everything():
    torch.manual_seed(0)
    rows, d_sae, k = 1000, 24, 5
    latents = torch.randn(rows, d_sae).relu() * (torch.rand(rows, d_sae) < 0.2)
    seq, pos = torch.arange(rows) // 10, torch.arange(rows) % 10
    st = new_stats(d_sae, k, "cpu")
    for start in range(0, rows, 96):  # chunks of another size than k, last one short
        update_stats(st, latents[start:start + 96], seq[start:start + 96], pos[start:start + 96])
    vals, idx = latents.topk(k, dim=0)
    torch.testing.assert_close(st.top_vals, vals)
    ok = vals > 0
    assert torch.equal(st.top_seq[ok], seq[idx][ok]) and torch.equal(st.top_pos[ok], pos[idx][ok])
    assert torch.equal(st.fired, (latents > 0).sum(0)) and int(st.l0_counts.sum()) == rows
    assert int(st.hist.sum()) == int((latents > 0).sum())


def test_contexts_are_one_per_sequence():
    vals = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 0.0])
    seqs, pos = np.array([3, 3, 1, 3, 2, 4]), np.array([5, 6, 0, 7, 1, 0])
    v, s, p = best_per_sequence(vals, seqs, pos, 3)
    assert v.tolist() == [9.0, 7.0, 5.0] and s.tolist() == [3, 1, 2] and p.tolist() == [5, 0, 1]
    v, s, _ = best_per_sequence(vals, seqs, pos, 10)  # fewer sequences than asked; zeros never shown
    assert s.tolist() == [3, 1, 2]


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    """A small TopK SAE trained on the tiny cache (seconds)."""
    from trainer.run import TrainConfig, run_train

    out = tmp_path_factory.mktemp("runs")
    run_train(TrainConfig(cache=str(cache), out=str(out), d_sae=256, k=8, batch_size=256, tokens=256 * 20,
                          log_every=10, checkpoint_every=1000, wandb=False, device="cpu"))
    return out / "topk-d256-k8"


@pytest.fixture(scope="module")
def report(cache, trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return build_report(ReportConfig(sae=str(trained), cache=str(cache), out=str(out), n_latents=6, contexts=4))


def test_report_html_has_histograms_and_context_tables(report, trained, cache, tmp_path):
    text = report.read_text(encoding="utf-8")
    dom = HTMLDom(text)
    assert {"summary", "density-histogram", "l0-histogram", "latents"} <= dom.ids
    assert dom.classes.get("latent") == 6 and dom.classes.get("activation-histogram") == 6
    assert dom.classes.get("context-table", 0) >= 1 and dom.classes.get("max", 0) >= 1
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    # Given latents are shown, in the given order.
    page = build_report(ReportConfig(sae=str(trained), cache=str(cache), out=str(tmp_path), latents=[7, 3],
                                     contexts=2, max_rows=500))
    assert {"latent-7", "latent-3"} <= HTMLDom(page.read_text()).ids
    assert page.read_text().index('id="latent-7"') < page.read_text().index('id="latent-3"')


def test_report_says_what_it_does_as_it_goes(trained, cache, tmp_path, capsys):
    from analysis.inference import load_sae
    from analysis.report import stream_stats
    from pipeline.reader import Cache

    heard = []
    stream_stats(Cache(cache), load_sae(trained, "cpu"), HOOK, "eval", 4, 128, 300, "cpu",
                 heard.append)
    assert heard == ["report: the pass over eval: 128/300 rows (43%)", "report: the pass over eval: 256/300 rows (85%)",
                     "report: the pass over eval: 300/300 rows (100%)"]
    build_report(ReportConfig(sae=str(trained), cache=str(cache), out=str(tmp_path), n_latents=2, contexts=2,
                              max_rows=300))
    assert capsys.readouterr().out.splitlines()[0] == f"report: loading {trained} (0:00 in)"


def test_report_opens_in_headless_chromium(report, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the page is not opened in a browser")
    # Root (CI containers) needs --no-sandbox; a fresh profile keeps the run independent of $HOME.
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
           "--dump-dom", report.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    dom = HTMLDom(out.stdout)
    assert "density-histogram" in dom.ids and dom.classes.get("context-table", 0) >= 1
    assert dom.body.get("data-ready") == "1"  # the page's script ran without an error before it


@pytest.mark.parametrize("arch,fields", [("standard", {}), ("topk", {"k": 4}), ("jumprelu", {}), ("gated", {}),
                                         ("batchtopk", {"k": 4})])
def test_load_sae_rebuilds_each_exported_architecture(tmp_path, arch, fields):
    from trainer.registry import get_architecture

    cls = get_architecture(arch)
    model = cls([cls.config_class(d_in=16, d_sae=40, seed=1, **fields)])
    x = torch.randn(64, 16)
    with torch.no_grad():
        for p in model.parameters():  # move off the tied init so every weight matters
            p.add_(0.05 * torch.randn_like(p))
    sae = load_sae(export_saelens(model, 0, tmp_path / arch, {"hook_name": HOOK}))
    assert sae.hook == HOOK and sae.d_sae == 40
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), model.decode(model.encode(x))[0], rtol=1e-5, atol=1e-5)


def test_sweep_eval_adds_ce_columns(cache, tmp_path):
    import csv

    from analysis.evaluate_ce import ce_columns
    from trainer.sweep import run_sweep

    spec = {"base": {"cache": str(cache), "out": str(tmp_path / "sw"), "d_sae": 128, "batch_size": 256,
                     "tokens": 256 * 10, "log_every": 5, "wandb": False, "device": "cpu"},
            "sweep": {"arch": ["topk", "standard"], "k": [8], "l1": [1.0]}}
    rows = run_sweep(spec, {}, name="t", evaluate_runs=ce_columns(str(cache), 4))
    with open(tmp_path / "sw" / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert {"ce_recovered_zero", "ce_recovered_mean", "kl"} <= set(table[0])
    for r in rows:
        assert r["status"] == "ok" and r["kl"] >= 0 and r["ce_recovered_zero"] <= 1.0 + 1e-6
