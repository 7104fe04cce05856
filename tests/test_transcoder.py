"""Transcoders: an architecture reads one hook and reconstructs another; skip-transcoders add a linear path
W_skip from one to the other (Paulo et al. 2025)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig
from trainer.export import export_saelens, init_from, load_saelens
from trainer.registry import get_architecture
from trainer.train import LoopConfig, train_stack
from tests.builders import small_corpus


def pairs(n_batches=150, batch=256, d_in=32, d_out=24, n_feat=24, k=3, seed=0):
    """(x, y) batches where both hooks are sparse codes of the same features through different
    dictionaries (an 'MLP' that a transcoder can learn): y = codes @ D_out, x = codes @ D_in + 1
    (the offset: a transcoder has no b_dec on its input and must centre it another way)."""
    g = torch.Generator().manual_seed(seed)
    d_inp = torch.nn.functional.normalize(torch.randn(n_feat, d_in, generator=g), dim=1)
    d_outp = torch.nn.functional.normalize(torch.randn(n_feat, d_out, generator=g), dim=1)
    out = []
    for _ in range(n_batches):
        idx = torch.rand(batch, n_feat, generator=g).argsort(dim=1)[:, :k]
        codes = torch.zeros(batch, n_feat).scatter_(1, idx, torch.rand(batch, k, generator=g) + 0.5)
        out.append((codes @ d_inp + 1.0, codes @ d_outp))
    return out


def with_linear_part(data, seed=5):
    """`pairs` whose output also has a dense linear image of the input (what a skip path is for)."""
    A = 0.3 * torch.randn(32, 24, generator=torch.Generator().manual_seed(seed))
    return [(x, y + (x - 1.0) @ A) for x, y in data]


def make(arch, R=1, **kw):
    cls = get_architecture(arch)
    extra = {"topk": {"k": 3}, "batchtopk": {"k": 3}, "standard": {"l1_coefficient": 0.05},
             "jumprelu": {"l0_coefficient": 0.01}}[arch]
    return cls([cls.config_class(d_in=32, d_sae=96, d_out=24, **{"seed": s, **extra, **kw}) for s in range(R)])


KINDS = {"topk": "topk_transcoder", "batchtopk": "jumprelu_transcoder", "standard": "transcoder",
         "jumprelu": "jumprelu_transcoder"}


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "standard", "jumprelu"])
def test_transcoder_learns_the_map_and_exports(tmp_path, arch, skip):
    model = make(arch, skip=skip)
    assert (model.W_skip is not None) == skip and (not skip or not model.W_skip.any())  # a skip path starts at 0
    data = with_linear_part(pairs()) if skip else pairs()
    last = train_stack(model, data, LoopConfig(lr=3e-3, log_every=50, total_steps=len(data)), log=None)
    assert model.W_dec.shape == (1, 96, 24) and model.W_enc.shape == (1, 32, 96)
    assert last["explained_variance"][0] > (0.9 if skip else 0.7), last
    export_saelens(model, 0, tmp_path / "tc", {"hook_name": "a", "hook_name_out": "b"})
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_out"] == 24 and cfg["apply_b_dec_to_input"] is False
    assert cfg["architecture"] == KINDS[arch].replace("transcoder", "skip_transcoder" if skip else "transcoder")
    again = make(arch, seed=7, skip=skip)
    init_from(again, tmp_path / "tc")
    x, _ = (with_linear_part if skip else list)(pairs(n_batches=1, seed=3))[0]
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x), x), model.decode(model.encode(x), x))
    sae_lens = pytest.importorskip("sae_lens")
    if arch == "topk":  # SAELens has ReLU and JumpReLU transcoders; ours adds the TopK ones to its registry
        from trainer.saelens_compat import register_topk_transcoder

        register_topk_transcoder()
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"), device="cpu")
    assert theirs.cfg.architecture() == cfg["architecture"]
    with torch.no_grad():  # SAELens's skip-transcoders add W_skip x in forward (decode is the latents' part)
        torch.testing.assert_close(theirs.encode(x), model.encode(x)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs(x), model.decode(model.encode(x), x)[0], rtol=1e-4, atol=1e-5)
    if skip:  # trained on 2 x and 0.5 y (the loader's normalisation): the export reads and writes raw ones
        export_saelens(model, 0, tmp_path / "scaled", {"hook_name": "a", "hook_name_out": "b"}, input_scale=2.0,
                       output_scale=0.5)
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "scaled"), device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), model.decode(model.encode(2 * x), 2 * x)[0] / 0.5, rtol=1e-4,
                                       atol=1e-5)


def test_skip_path_beats_a_plain_transcoder_at_the_same_l0():
    data = with_linear_part(pairs())
    ev = {}
    for skip in (False, True):
        last = train_stack(make("topk", skip=skip), data, LoopConfig(lr=3e-3, log_every=50, total_steps=len(data)),
                           log=None)
        ev[skip] = last["explained_variance"][0]
    assert ev[True] > ev[False] + 0.05, ev


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_transcoder_stack_equals_single_runs(skip):
    data = with_linear_part(pairs(n_batches=20))
    stack = make("topk", R=2, skip=skip)
    train_stack(stack, data, LoopConfig(lr=3e-3, log_every=100), log=None)
    for r in range(2):
        single = get_architecture("topk")([stack.cfgs[r]])
        train_stack(single, data, LoopConfig(lr=3e-3, log_every=100), log=None)
        torch.testing.assert_close(stack.W_dec[r], single.W_dec[0], rtol=1e-5, atol=1e-6)
        if skip:
            torch.testing.assert_close(stack.W_skip[r], single.W_skip[0], rtol=1e-5, atol=1e-6)


def test_skip_needs_a_transcoder_and_its_weights():
    from trainer.run import TrainConfig, run_config

    with pytest.raises(PipelineError, match="skip = true needs a transcoder"):
        get_architecture("topk")([get_architecture("topk").config_class(d_in=8, d_sae=16, k=2, skip=True)])
    with pytest.raises(PipelineError, match="--skip adds a path from the input hook to the output hook"):
        run_config(TrainConfig(skip=True), 8)
    plain, skip = make("standard"), make("standard", skip=True)
    with pytest.raises(PipelineError, match="needs W_skip, which the saved weights lack .* drop skip"):
        skip.load_run(0, plain.export_run(0)[0], {"architecture": "transcoder"})
    with pytest.raises(PipelineError, match=r"decode\(latents, x\)"):
        skip.decode(skip.encode(torch.zeros(2, 32)))


def test_architectures_without_a_transcoder_form_say_so():
    cls = get_architecture("matryoshka")
    with pytest.raises(PipelineError, match="cannot be trained as a transcoder; use topk, batchtopk, standard or jumprelu"):
        cls([cls.config_class(d_in=16, d_sae=32, k=2, d_out=8)])


def test_pipeline_train_transcoder_from_a_two_hook_cache(tmp_path):
    from trainer.run import TrainConfig, run_train

    w = CacheWriter(tmp_path / "c", {"a": 32, "b": 24}, WriterConfig(shard_mb=0.5))
    data = pairs(n_batches=141, seed=1)  # one map: 120 batches to train on, 20 held out, 1 to check
    for i, (x, y) in enumerate(data[:140]):
        w.put(ActivationBlock({"a": x, "b": y}, split="train" if i < 120 else "eval"))
    w.close()
    m = run_train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "runs"), hook="a", hook_out="b",
                              d_sae=96, k=3, batch_size=256, tokens=256 * 240, lr=3e-3, lr_warmup_steps=10,
                              log_every=40, wandb=False, normalize=True))
    assert m["eval_explained_variance"][0] > 0.7, m
    run = tmp_path / "runs" / "topk-d96-k3"
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_transcoder" and cfg["metadata"]["hook_name"] == "a"
    assert cfg["metadata"]["hook_name_out"] == "b"
    # The export reads raw activations: both hooks' normalisation factors are folded in.
    weights, _ = load_saelens(run)
    model = get_architecture("topk")([get_architecture("topk").config_class(d_in=32, d_sae=96, k=3, d_out=24)])
    model.load_run(0, weights, cfg)
    x, y = data[140]
    with torch.no_grad():
        recon = model.decode(model.encode(x))[0]
    assert 1 - (recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum() > 0.7
    with pytest.raises(PipelineError, match="hook_out 'c' is not in the cache"):
        run_train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "r2"), hook="a", hook_out="c",
                              wandb=False))


# ------------------------------------------------------------------------------ eval and report of a transcoder

TC_IN, TC_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"  # the MLP's input and output
RESID_POST0, RESID_PRE1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"  # one tensor, two hook names


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """The shipped tiny model's cache with a transcoder's two hooks, and two hooks that hold the same values."""
    from cache_writer.run import CacheConfig, run_cache

    root = tmp_path_factory.mktemp("tc_eval")
    torch.set_num_threads(1)
    run_cache(CacheConfig(out=str(root / "c"), dataset=small_corpus(root / "docs"), tokens=8000, context_size=64,
                          eval_fraction=0.3, hooks=[TC_IN, TC_OUT, RESID_POST0, RESID_PRE1]), progress=False)
    return root / "c"


def relu_transcoder(out, W_enc, W_dec, hook_in, hook_out):
    """A ReLU transcoder with zero biases, exported as SAELens's `transcoder`."""
    d_in, d_sae = W_enc.shape
    model = make_arch("standard", d_in, d_sae, W_dec.shape[1])
    model.load_run(0, {"W_enc": W_enc, "W_dec": W_dec, "b_enc": torch.zeros(d_sae),
                       "b_dec": torch.zeros(W_dec.shape[1])}, {})
    return export_saelens(model, 0, out, {"hook_name": hook_in, "hook_name_out": hook_out})


def make_arch(arch, d_in, d_sae, d_out, **kw):
    cls = get_architecture(arch)
    return cls([cls.config_class(d_in=d_in, d_sae=d_sae, d_out=d_out, **kw)])


@pytest.mark.parametrize("arch,kind", [("standard", "transcoder"), ("jumprelu", "jumprelu_transcoder"),
                                       ("topk", "topk_transcoder")])
def test_load_sae_reads_every_transcoder_kind(tmp_path, arch, kind):
    from analysis.inference import load_sae

    model = make_arch(arch, 16, 40, 12, seed=1, **({"k": 4} if arch == "topk" else {}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.b_in.normal_()  # an input centring, folded into b_enc by the export
    sae = load_sae(export_saelens(model, 0, tmp_path / kind, {"hook_name": "a", "hook_name_out": "b"}))
    assert sae.architecture == kind and sae.is_transcoder and (sae.hook, sae.hook_out) == ("a", "b")
    assert (sae.d_in, sae.d_sae, sae.d_out) == (16, 40, 12)
    x = torch.randn(64, 16)
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), model.decode(model.encode(x))[0], rtol=1e-5, atol=1e-5)


def test_eval_splices_a_transcoder_reading_one_hook_and_replacing_another(model_cache, tmp_path):
    from analysis.evaluate_ce import EvalConfig, evaluate_ce

    eye = torch.eye(128)
    # The identity from resid_post of block 0 to resid_pre of block 1 (the same tensor): exact only if
    # the transcoder reads its input hook and replaces its output hook at the same positions.
    exact = relu_transcoder(tmp_path / "exact", torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0),
                            RESID_POST0, RESID_PRE1)
    res = evaluate_ce(EvalConfig(sae=str(exact), cache=str(model_cache), contexts=8))
    assert res["hook"] == RESID_POST0 and res["hook_out"] == RESID_PRE1 and res["architecture"] == "transcoder"
    assert res["ce_spliced"] == pytest.approx(res["ce_clean"], abs=1e-5) and abs(res["kl_spliced"]) < 1e-5
    assert res["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert res["ce_zero_ablation"] > res["ce_clean"] + 0.1
    # A transcoder whose output is 0 is the zero ablation of the output hook (not of its input hook).
    zero = relu_transcoder(tmp_path / "zero", torch.zeros(128, 8), torch.zeros(8, 128), TC_IN, TC_OUT)
    res = evaluate_ce(EvalConfig(sae=str(zero), cache=str(model_cache), contexts=8))
    assert res["ce_spliced"] == pytest.approx(res["ce_zero_ablation"], abs=1e-6) and res["hook_out"] == TC_OUT
    # Reading a hook that comes after the one replaced cannot work: said in one line.
    backwards = relu_transcoder(tmp_path / "back", torch.zeros(128, 8), torch.zeros(8, 128), RESID_PRE1, RESID_POST0)
    with pytest.raises(PipelineError, match="runs after blocks.0.hook_resid_post"):
        evaluate_ce(EvalConfig(sae=str(backwards), cache=str(model_cache), contexts=2))


def test_trained_transcoder_evaluates_and_reports(model_cache, tmp_path):
    from analysis.evaluate_ce import EvalConfig, evaluate_ce
    from analysis.report import ReportConfig, build_report
    from trainer.run import TrainConfig, run_train

    run_train(TrainConfig(cache=str(model_cache), out=str(tmp_path / "runs"), hook=TC_IN, hook_out=TC_OUT, d_sae=256,
                          k=8, batch_size=256, tokens=256 * 60, lr=3e-3, lr_warmup_steps=5, log_every=20,
                          wandb=False, device="cpu"))
    run = tmp_path / "runs" / "topk-d256-k8"
    res = evaluate_ce(EvalConfig(sae=str(run), cache=str(model_cache), contexts=8))
    assert res["architecture"] == "topk_transcoder" and res["hook_out"] == TC_OUT
    assert res["ce_clean"] < res["ce_spliced"] < res["ce_zero_ablation"] and 0 < res["explained_variance"] < 1
    assert res["l0"] == pytest.approx(8.0, abs=0.5)
    page = build_report(ReportConfig(sae=str(run), cache=str(model_cache), out=str(tmp_path / "report"), n_latents=4,
                                     contexts=3, ce_contexts=4))
    text = page.read_text()
    assert f"reconstructs {TC_OUT}" in text and text.count('class="latent"') == 4
    assert "CE loss recovered" in text
    # Logit effects from the output side: its decoder writes the MLP output into the residual stream.
    assert text.count('class="logit-table"') == 4 and f"{TC_OUT} writes into the residual stream" in text
    # SAEBench's core metrics reconstruct the output hook: the same explained variance as training's
    # eval on the whole split.
    from analysis.core_metrics import core_eval

    core = core_eval(EvalConfig(sae=str(run), cache=str(model_cache), contexts=2))
    trained = json.loads((run / "summary.json").read_text())
    assert core["eval_result_metrics"]["reconstruction_quality"]["explained_variance"] == pytest.approx(
        trained["eval_explained_variance"], rel=1e-4)
    assert core["eval_result_unstructured"]["hook_out"] == TC_OUT


def test_eval_splices_a_transcoder_into_a_hugging_face_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cache_writer.run import CacheConfig, run_cache
    from analysis.evaluate_ce import EvalConfig, evaluate_ce

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    run_cache(CacheConfig(out=str(tmp_path / "c"), model=str(tmp_path / "gpt2"), tokenizer="bytes", context_size=32,
                          hooks=["transformer.h.0.ln_2", "transformer.h.0.mlp"], tokens=2000, eval_fraction=0.5),
              progress=False)
    zero = relu_transcoder(tmp_path / "zero", torch.zeros(32, 8), torch.zeros(8, 32), "transformer.h.0.ln_2",
                           "transformer.h.0.mlp")
    res = evaluate_ce(EvalConfig(sae=str(zero), cache=str(tmp_path / "c"), contexts=4, device="cpu"))
    assert res["hook_out"] == "transformer.h.0.mlp"
    assert res["ce_spliced"] == pytest.approx(res["ce_zero_ablation"], abs=1e-6)
    assert res["ce_zero_ablation"] != pytest.approx(res["ce_clean"], abs=1e-6)  # the output hook was replaced
