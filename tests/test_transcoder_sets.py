"""Per-layer transcoder sets from one cache: `pipeline cache --preset mlp` writes every layer's MLP input
and output in one pass, one sweep trains sets of (skip-)transcoders over them (every layer, several
L0s), and circuit-tracer's own loaders read the sets with our encode and decode."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.loader import ActivationLoader
from tests.builders import small_corpus

MLP_IN, MLP_OUT = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"
HOOKS = [h.replace("{layer}", str(n)) for n in (0, 1) for h in (MLP_IN, MLP_OUT)]


@pytest.fixture(scope="module")
def mlp_cache(tmp_path_factory):
    """The shipped tiny model's (2 layers) cache written with the MLP preset."""
    from cache_writer.run import CacheConfig, run_cache

    root = tmp_path_factory.mktemp("mlp")
    run_cache(CacheConfig(out=str(root / "c"), dataset=small_corpus(root / "docs"), tokens=6000, context_size=64,
                          eval_fraction=0.2, preset="mlp"), progress=False)
    return root / "c"


def test_mlp_preset_writes_every_layers_mlp_input_and_output_row_aligned(mlp_cache):
    from cache_writer.tiny_model import load_tiny_model

    assert json.loads((mlp_cache / "manifest.json").read_text())["hooks"].keys() == set(HOOKS)
    model = load_tiny_model()
    loader = ActivationLoader(mlp_cache, hooks=HOOKS, batch_size=512)
    batch = next(iter(loader))
    assert set(batch) == set(HOOKS)
    for n in (0, 1):  # each row's MLP output is the model's MLP applied to the same row's input
        normalized, mlp_out = (batch[h.replace("{layer}", str(n))] for h in (MLP_IN, MLP_OUT))
        ln2 = model.blocks[n].ln2  # hook_normalized comes before the norm's own scale and bias
        with torch.no_grad():
            mlp = model.blocks[n].mlp((normalized * ln2.w + ln2.b).unsqueeze(0))[0]
        torch.testing.assert_close(mlp, mlp_out, rtol=1e-4, atol=1e-4)


def test_the_cache_says_its_size_before_writing_and_refuses_a_full_disk(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    from cache_writer.run import CacheConfig, run_cache

    cfg = CacheConfig(out=str(tmp_path / "c"), dataset=small_corpus(tmp_path / "docs"), tokens=640, context_size=64,
                      eval_fraction=0.2, preset="mlp")
    run_cache(cfg, progress=False)
    said = capsys.readouterr().out
    assert "the cache needs about 1.3 MiB of disk (4 hooks, 512 values a row, float32); " in said, said
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**10, 2**10))
    with pytest.raises(PipelineError, match=r"^not enough disk space for the cache in .*: it needs ~0\.00 GiB, "
                                            r"0\.00 GiB are free; free space"):
        run_cache(CacheConfig(**{**cfg.__dict__, "out": str(tmp_path / "d")}), progress=False)


def test_a_preset_the_model_lacks_is_one_line():
    from cache_writer.model_adapter import load_model, preset_hooks

    with pytest.raises(PipelineError, match="unknown hook preset 'attn'; presets: mlp"):
        preset_hooks(load_model("tiny"), "attn")


def set_spec(cache, out, **base):
    return {"base": {"cache": str(cache), "out": str(out), "hook": MLP_IN, "hook_out": MLP_OUT, "layers": "all",
                     "d_sae": 128, "batch_size": 256, "tokens": 256 * 12, "log_every": 4, "checkpoint_every": 1000,
                     "lr": 3e-3, "wandb": False, **base},
            "runs": [{"name": "btk_skip", "arch": "batchtopk", "skip": True, "target_l0": 8},
                     {"name": "relu_skip", "arch": "standard", "skip": True, "target_l0": 8},
                     {"name": "jump", "arch": "jumprelu", "target_l0": 8},
                     {"name": "topk_skip", "arch": "topk", "skip": True, "k": 8}]}


SETS = ("btk_skip", "relu_skip", "jump", "topk_skip")


@pytest.fixture(scope="module")
def sweep_out(mlp_cache, tmp_path_factory):
    from trainer.sweep import run_sweep

    out = tmp_path_factory.mktemp("sets") / "a"
    rows = run_sweep(set_spec(mlp_cache, out), {}, name="sets")
    assert [r["run"] for r in rows] == [f"{s}/layer_{n}" for s in SETS for n in (0, 1)]
    assert all(r["status"] == "ok" for r in rows), rows
    return out


@pytest.mark.slow  # a whole sweep twice, or a real training process
def test_one_sweep_trains_every_layer_of_every_set_and_resumes_bit_identical(sweep_out, mlp_cache, tmp_path):
    from trainer.sweep import run_sweep

    for s in SETS:
        for n in (0, 1):
            cfg = json.loads((sweep_out / s / f"layer_{n}" / "cfg.json").read_text())
            assert cfg["metadata"]["hook_name"] == f"blocks.{n}.ln2.hook_normalized"
            assert cfg["metadata"]["hook_name_out"] == f"blocks.{n}.hook_mlp_out"
            assert cfg["architecture"].endswith("skip_transcoder" if "skip" in s else "_transcoder"), cfg
    # circuit-tracer reads ReLU and JumpReLU transcoders: the TopK set stays in SAELens's format only.
    assert all((sweep_out / s / "config.yaml").is_file() for s in SETS[:3])
    assert not (sweep_out / "topk_skip" / "config.yaml").exists()
    run_sweep(set_spec(mlp_cache, tmp_path / "b"), {}, name="sets", max_steps=5)
    run_sweep(set_spec(mlp_cache, tmp_path / "b", resume=True), {}, name="sets")
    for s in SETS:
        for n in (0, 1):
            a = load_file(str(sweep_out / s / f"layer_{n}" / "sae_weights.safetensors"))
            b = load_file(str(tmp_path / "b" / s / f"layer_{n}" / "sae_weights.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (s, n)
            assert ("W_skip" in a) == ("skip" in s)


@pytest.mark.parametrize("name", SETS[:3])
def test_circuit_tracer_loads_our_sets_with_our_encode_and_decode(sweep_out, mlp_cache, name):
    yaml = pytest.importorskip("yaml")
    ct = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
    from analysis.inference import load_sae

    folder = sweep_out / name
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config == {"model_name": "tiny", "model_kind": "transcoder_set",
                      "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    theirs = ct.load_transcoder_set({n: str(folder / f"layer_{n}.safetensors") for n in (0, 1)}, scan=name,
                                    feature_input_hook=config["feature_input_hook"],
                                    feature_output_hook=config["feature_output_hook"], device=torch.device("cpu"))
    assert theirs.skip_connection == ("skip" in name) and theirs.n_layers == 2
    eval_rows = next(iter(ActivationLoader(mlp_cache, hooks=HOOKS, batch_size=256, split="eval")))
    x = torch.stack([eval_rows[f"blocks.{n}.ln2.hook_normalized"] for n in (0, 1)])  # (layers, rows, d_model)
    ours = [load_sae(folder / f"layer_{n}") for n in (0, 1)]
    with torch.no_grad():
        acts = theirs.encode(x)
        for n in (0, 1):
            torch.testing.assert_close(acts[n], ours[n].encode(x[n]), rtol=0, atol=1e-5)
            assert (acts[n] > 0).any()
        recon = theirs.decode(acts, x)
        for n in (0, 1):
            torch.testing.assert_close(recon[n], ours[n].reconstruct(x[n]), rtol=0, atol=1e-5)
        # The one-layer loader too (circuit-tracer's own name for it), eagerly loaded.
        one = ct.load_relu_transcoder(str(folder / "layer_1.safetensors"), 1, device=torch.device("cpu"),
                                      lazy_encoder=False, lazy_decoder=False)
        torch.testing.assert_close(one(x[1]), ours[1].reconstruct(x[1]), rtol=0, atol=1e-5)


def test_bad_sets_are_one_line_each(tmp_path):
    from trainer.export import export_saelens
    from trainer.export_circuit_tracer import write_transcoder_set
    from trainer.registry import get_architecture
    from trainer.run import TrainConfig, run_train
    from trainer.sweep import plan_sweep

    tiny = {h.replace("{layer}", str(n)): 128 for n in (0, 1) for h in (MLP_IN, MLP_OUT)}

    def refused(d_in, **base):
        spec = {"base": {"hook": MLP_IN, "hook_out": MLP_OUT, "layers": "all", "arch": "topk", "k": 4, **base}}
        plan = plan_sweep(spec, {}, "t", d_in)
        assert not plan.runs and len(plan.refused) == 1
        return next(iter(plan.refused.values()))

    assert refused(tiny, layers=[0, 2]) == ("layer 2's blocks.2.ln2.hook_normalized and blocks.2.hook_mlp_out not in "
                                            "the cache; it has " + ", ".join(tiny))
    assert refused(tiny, layers=[1, 0]) == "layers [1, 0] must increase, each once; e.g. [0, 1]"
    assert refused({"blocks.0.hook_resid_post": 128}).startswith(
        "the cache has no layer with both blocks.{layer}.ln2.hook_normalized and blocks.{layer}.hook_mlp_out; its "
        "hooks: blocks.0.hook_resid_post (`pipeline cache --preset mlp`")
    assert refused(tiny, hook="blocks.0.ln2.hook_normalized").startswith(
        "a per-layer set (layers) needs hook and hook_out naming each layer's with {layer}")
    assert refused({**tiny, "blocks.1.hook_mlp_out": 96}) == (
        "d_out differs across the set's layers: blocks.1.hook_mlp_out is 96 wide, blocks.0.hook_mlp_out is 128; a "
        "set's layers share one shape (split it into sets of equal widths)")
    with pytest.raises(PipelineError, match=r"^a per-layer set \(layers\) is trained by `pipeline sweep`"):
        run_train(TrainConfig(layers="all", hook=MLP_IN, hook_out=MLP_OUT))
    # circuit-tracer's transcoders read and write one width: a transcoder from 16 to 8 is refused with both.
    cls = get_architecture("standard")
    narrow = export_saelens(cls([cls.config_class(d_in=16, d_sae=32, d_out=8)]), 0, tmp_path / "n",
                            {"hook_name": "blocks.0.ln2.hook_normalized", "hook_name_out": "blocks.0.hook_mlp_out"})
    with pytest.raises(PipelineError, match=r"reads width d_in = 16 and writes d_out = 8: circuit-tracer's "
                                            "SingleLayerTranscoder reads and writes the residual width d_model"):
        write_transcoder_set(tmp_path / "set", {0: narrow})
    with pytest.raises(PipelineError, match="needs a transcoder for every layer from 0; this set has layers 1"):
        write_transcoder_set(tmp_path / "set", {1: narrow})
