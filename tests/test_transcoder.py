"""Transcoders: an architecture reads one hook and reconstructs another."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig
from trainer.export import export_saelens, init_from, load_saelens
from trainer.registry import get_architecture
from trainer.train import LoopConfig, train_stack


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


def make(arch, R=1, **kw):
    cls = get_architecture(arch)
    extra = {"topk": {"k": 3}, "standard": {"l1_coefficient": 0.05}, "jumprelu": {"l0_coefficient": 0.01}}[arch]
    return cls([cls.config_class(d_in=32, d_sae=96, d_out=24, **{"seed": s, **extra, **kw}) for s in range(R)])


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu"])
def test_transcoder_learns_the_map_and_exports(tmp_path, arch):
    model = make(arch)
    data = pairs()
    last = train_stack(model, data, LoopConfig(lr=3e-3, log_every=50, total_steps=len(data)), log=None)
    assert model.W_dec.shape == (1, 96, 24) and model.W_enc.shape == (1, 32, 96)
    assert last["explained_variance"][0] > 0.7, last
    export_saelens(model, 0, tmp_path / "tc", {"hook_name": "a", "hook_name_out": "b"})
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_out"] == 24 and cfg["apply_b_dec_to_input"] is False
    assert cfg["architecture"] == {"topk": "topk_transcoder", "standard": "transcoder",
                                   "jumprelu": "jumprelu_transcoder"}[arch]
    again = make(arch, seed=7)
    init_from(again, tmp_path / "tc")
    x, _ = pairs(n_batches=1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x)), model.decode(model.encode(x)))
    if arch != "topk":  # SAELens has ReLU and JumpReLU transcoders (not TopK ones)
        sae_lens = pytest.importorskip("sae_lens")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"), device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), model.encode(x)[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(theirs.decode(theirs.encode(x)), model.decode(model.encode(x))[0],
                                       rtol=1e-4, atol=1e-5)


def test_transcoder_stack_equals_single_runs():
    data = pairs(n_batches=20)
    stack = make("topk", R=2)
    train_stack(stack, data, LoopConfig(lr=3e-3, log_every=100), log=None)
    for r in range(2):
        single = get_architecture("topk")([stack.cfgs[r]])
        train_stack(single, data, LoopConfig(lr=3e-3, log_every=100), log=None)
        torch.testing.assert_close(stack.W_dec[r], single.W_dec[0], rtol=1e-5, atol=1e-6)


def test_architectures_without_a_transcoder_form_say_so():
    cls = get_architecture("batchtopk")
    with pytest.raises(PipelineError, match="cannot be trained as a transcoder; use topk, standard or jumprelu"):
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
