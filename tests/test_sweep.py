"""Sweeps: many runs from one pass over a cache, stacked where they share a shape."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from pipeline.errors import PipelineError
from trainer.sweep import expand_runs, name_runs, run_sweep
from tests.builders import sparse_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "c"
    sparse_cache(path, rows=8000, eval_rows=2000)
    return path


def spec(cache, out, **base):
    return {"base": {"cache": str(cache), "out": str(out), "d_sae": 64, "batch_size": 256, "tokens": 256 * 40,
                     "log_every": 10, "checkpoint_every": 10, "wandb": False, "lr": 3e-3, **base},
            "sweep": {"arch": ["topk", "standard"], "k": [3, 6], "l1": [0.5], "seed": [0]}}


def test_names_and_irrelevant_fields_do_not_multiply_runs():
    base, runs = expand_runs({"base": {"d_sae": 64}, "sweep": {"arch": ["topk", "standard"], "k": [4, 8],
                                                               "l1": [1.0, 2.0]}}, {})
    assert len(runs) == 8
    names = [r.name for r in name_runs(runs)]
    assert names == ["topk-k4", "topk-k8", "standard-l1_1", "standard-l1_2"]
    # [[runs]] where one run leaves a field unset (its architecture's default) that another sets.
    _, runs = expand_runs({"base": {"d_sae": 64}, "runs": [{"arch": "standard"}, {"arch": "standard", "l1": 2.0},
                                                            {"arch": "topk", "k": 8}]}, {})
    assert [r.name for r in name_runs(runs)] == ["standard-d64-l1_5", "standard-l1_2", "topk-k8"]
    with pytest.raises(PipelineError, match="cannot vary batch_size"):
        expand_runs({"sweep": {"batch_size": [1, 2]}}, {})
    with pytest.raises(PipelineError, match=r"unknown field\(s\) kk in \[sweep\]"):
        expand_runs({"sweep": {"kk": [1]}}, {})


def test_mixed_sweep_writes_runs_summary_and_plot(cache, tmp_path):
    s = spec(cache, tmp_path / "out")
    s["sweep"]["k"] = [3, 6, 100]  # k = 100 > d_sae: that run is refused, the others go on
    rows = run_sweep(s, {}, name="t")
    by_name = {r["run"]: r for r in rows}
    assert set(by_name) == {"topk-k3", "topk-k6", "topk-k100", "standard-d64-l1_0.5"}
    assert by_name["topk-k100"]["status"].startswith("refused: k = 100 must be between 1 and d_sae = 64")
    for name in ("topk-k3", "topk-k6", "standard-d64-l1_0.5"):
        r = by_name[name]
        assert r["status"] == "ok" and r["explained_variance"] > 0.5, r
        cfg = json.loads((tmp_path / "out" / name / "cfg.json").read_text())
        assert cfg["metadata"]["sweep"] == "t" and cfg["d_sae"] == 64
        lines = (tmp_path / "out" / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [10, 20, 30, 40]
    assert by_name["topk-k3"]["l0"] == pytest.approx(3.0) and by_name["topk-k6"]["l0"] == pytest.approx(6.0)
    with open(tmp_path / "out" / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["run"] for t in table] == ["topk-k3", "topk-k6", "standard-d64-l1_0.5", "topk-k100"]
    png = (tmp_path / "out" / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_stacks_group_runs_of_one_shape_and_one_k():
    from trainer.sweep import plan_sweep

    runs = [{"arch": "topk", "k": 3, "seed": 0}, {"arch": "topk", "k": 6}, {"arch": "topk", "k": 3, "seed": 1},
            {"arch": "standard", "k": 3, "l1": 5.0}, {"arch": "standard", "k": 6, "l1": 2.0},
            {"arch": "topk", "k": 3, "d_sae": 32, "seed": 2}]
    spec_ = {"base": {"d_sae": 64}, "runs": runs}
    plan = plan_sweep(spec_, {}, "t", {"h": 16})
    # A TopK stack computes its largest k for every run: k = 3 and k = 6 are stepped apart. k means
    # nothing to a standard SAE, so its runs stack whatever their k; another d_sae is another stack.
    assert [[plan.runs[i].name for i in idx] for idx in plan.stacks] == [
        ["topk-d64-k3-s0", "topk-d64-k3-s1"], ["topk-d64-k6-s0"], ["standard-d64-l1_5-s0", "standard-d64-l1_2-s0"],
        ["topk-d32-k3-s2"]]


def test_stacked_sweep_run_equals_the_run_trained_alone(cache, tmp_path):
    from trainer.run import TrainConfig, run_train

    s = spec(cache, tmp_path / "sw")
    s["sweep"] = {"arch": ["topk"], "k": [6], "seed": [0, 1]}  # one stack of two runs
    run_sweep(s, {}, name="t")
    alone = run_train(TrainConfig(**{**s["base"], "out": str(tmp_path / "alone"), "k": 6, "arch": "topk"}))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "sw" / "topk-s0" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "alone" / "topk-d64-k6" / "sae_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert alone["eval_l0"][0] == pytest.approx(6.0)


@pytest.mark.slow  # a whole sweep twice, or a real training process
def test_sweep_resume_equals_straight_sweep(cache, tmp_path):
    from safetensors.torch import load_file

    run_sweep(spec(cache, tmp_path / "a"), {}, name="t")
    run_sweep(spec(cache, tmp_path / "b"), {}, name="t", max_steps=25)  # off the logging grid
    with pytest.raises(PipelineError, match="holds a sweep checkpoint; pass --resume"):
        run_sweep(spec(cache, tmp_path / "b"), {}, name="t")
    run_sweep(spec(cache, tmp_path / "b", resume=True), {}, name="t")
    for run in ("topk-k3", "topk-k6", "standard-d64-l1_0.5"):
        a = load_file(str(tmp_path / "a" / run / "sae_weights.safetensors"))
        b = load_file(str(tmp_path / "b" / run / "sae_weights.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), run
        # The firing window under way at the checkpoint is in it: the same dead/dense fractions.
        assert window_fractions(tmp_path / "a" / run) == window_fractions(tmp_path / "b" / run), run
    # A kill between the checkpoint's renames, then a resume with no step left: named back.
    ckpt = tmp_path / "b" / "_sweep" / "checkpoint"
    ckpt.rename(ckpt.with_name("checkpoint.old"))
    run_sweep(spec(cache, tmp_path / "b", resume=True), {}, name="t")
    assert (ckpt / "state.json").is_file() and not ckpt.with_name("checkpoint.old").exists()


def window_fractions(run_dir) -> list[tuple]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["dead_fraction"], m["dense_fraction"]) for m in lines]


def test_memory_refusal_names_how_many_runs_fit(cache, tmp_path):
    from trainer.memory import stack_bytes, stacks_bytes
    from trainer.run import run_config
    from trainer.sweep import plan_sweep

    s = spec(cache, tmp_path / "m")
    s["sweep"].update(k=[3], seed=[0, 1])  # a stack of two TopK runs, then one of two standard runs
    plan = plan_sweep(s, {}, "t", {"x": 32})
    topk = [plan.runs[i] for i in plan.stacks[0]]
    assert [r.arch for r in topk] == ["topk", "topk"]
    held, peak = stack_bytes("topk", [run_config(r, 32) for r in topk], 256)
    assert 0 < held < peak == stacks_bytes([(held, peak)])
    budget = peak + 1000  # room for the stack of two TopK runs and its step, not for the third run
    with pytest.raises(PipelineError, match=r"needs about .* MiB for 4 runs but .* MiB is available: 2 of its runs fit"):
        run_sweep(s, {}, name="t", memory_budget=budget)


@pytest.mark.parametrize("field,value", [("tokens", 0), ("tokens", -1), ("batch_size", 0), ("d_sae", 0), ("k", -3),
                                         ("lr_warmup_steps", -1)])
def test_non_positive_sizes_are_refused_by_train_and_sweep(cache, tmp_path, field, value):
    """`pipeline train --tokens 0` once exported an untrained SAE."""
    from trainer.run import TrainConfig, run_train

    flag = f"--{field.replace('_', '-')} must be a number"
    with pytest.raises(PipelineError, match=flag):
        run_train(TrainConfig(cache=str(cache), out=str(tmp_path / "t"), wandb=False, **{field: value}))
    with pytest.raises(PipelineError, match=flag):
        run_sweep(spec(cache, tmp_path / "s", **{field: value}), {})
    if field != "batch_size":  # one value for the whole sweep, never in [sweep]
        bad = spec(cache, tmp_path / "s")
        bad["sweep"][field] = [value]
        with pytest.raises(PipelineError, match=flag):
            run_sweep(bad, {})
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


def test_cli_train_and_sweep_refuse_zero_tokens_in_one_line(cache, tmp_path, cli):
    toml = tmp_path / "sweep.toml"
    toml.write_text(f'[base]\ncache = "{cache}"\nd_sae = 64\n[sweep]\nk = [3, 6]\n')
    for args in (["train", "--cache", str(cache), "--tokens", "0", "--out", str(tmp_path / "t")],
                 ["sweep", "--config", str(toml), "--tokens", "0", "--out", str(tmp_path / "s")]):
        code, err, _ = cli(*args)
        assert code == 2 and err == "error: --tokens must be a number > 0, got 0\n", err
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


def test_a_run_without_lr_records_the_default_for_its_width(cache, tmp_path):
    """lr unset: the summary, the export's training_config and the metric lines give the lr used."""
    from trainer.train import default_lr

    s = spec(cache, tmp_path / "out", tokens=256 * 10)
    del s["base"]["lr"]
    s["sweep"] = {"arch": ["topk"], "k": [3]}
    run_sweep(s, {}, name="t")
    with open(tmp_path / "out" / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["lr"]) == pytest.approx(default_lr(64)) == pytest.approx(3e-3 * 32 ** 0.5)
    meta = json.loads((tmp_path / "out" / row["run"] / "cfg.json").read_text())["metadata"]
    assert meta["training_config"]["lr"] == pytest.approx(default_lr(64))
    first = json.loads((tmp_path / "out" / row["run"] / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < first["lr"] <= default_lr(64)
