"""The training loop on a real cache through the loader, and an export SAELens loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.loader import ActivationLoader
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig
from trainer.sae_standard import StandardConfig, StandardSAE
from trainer.sae_topk import TopKConfig, TopKSAE
from trainer.export import export_saelens
from trainer.train import LoopConfig, lr_factors, run_lengths, train_stack
from tests.builders import sparse_batches, sparse_cache


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """`lr_factors` for one run of cfg.total_steps steps at host `step`."""
    return float(lr_factors(torch.tensor(float(step), dtype=torch.float64), cfg, run_lengths([cfg.total_steps]))[0])


def test_topk_trains_on_a_cache_and_logs(tmp_path):
    sparse_cache(tmp_path / "c")
    loader = ActivationLoader(tmp_path / "c", batch_size=256, tokens=256 * 400)
    model = TopKSAE([TopKConfig(d_in=32, d_sae=128, k=3, seed=0), TopKConfig(d_in=32, d_sae=128, k=6, seed=1)])
    cfg = LoopConfig(lr=3e-3, lr_warmup_steps=20, lr_decay="cosine", total_steps=400, log_every=100,
                     metrics_path=str(tmp_path / "metrics.jsonl"))
    last = train_stack(model, loader, cfg, log=None)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [100, 200, 300, 400]
    assert last["l0"] == pytest.approx([3.0, 6.0])
    assert min(last["explained_variance"]) > 0.8, last["explained_variance"]
    assert lines[-1]["mse"][0] < lines[0]["mse"][0]


def test_standard_l1_lowers_l0(tmp_path):
    sparse_cache(tmp_path / "c")
    loader = ActivationLoader(tmp_path / "c", batch_size=256, tokens=256 * 300)
    model = StandardSAE([StandardConfig(d_in=32, d_sae=128, l1_coefficient=c, l1_warmup_steps=50, seed=0)
                         for c in (0.01, 1.0)])
    last = train_stack(model, loader, LoopConfig(lr=3e-3, total_steps=300, log_every=300), log=None)
    assert last["l0"][1] < last["l0"][0]  # a larger L1 coefficient buys a sparser code
    assert last["explained_variance"][0] > 0.8


def test_lr_schedules():
    cfg = LoopConfig(lr_warmup_steps=10, total_steps=100, lr_decay="linear")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(50, cfg) == 1.0
    assert lr_factor(90, cfg) == pytest.approx(0.5) and lr_factor(100, cfg) == 0.0
    cos = LoopConfig(lr_warmup_steps=0, total_steps=100, lr_decay="cosine")
    assert lr_factor(0, cos) == pytest.approx(1.0) and lr_factor(100, cos) == pytest.approx(0.1)
    # Per run, on the loop's device tensors: runs of 100 and 200 steps, and one of unknown length.
    totals = torch.tensor([100.0, 200.0, float("nan")], dtype=torch.float64)
    got = lr_factors(torch.tensor(90.0, dtype=torch.float64), cfg, totals)
    assert got.tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert lr_factors(torch.tensor(3.0, dtype=torch.float64), cfg, totals).tolist() == pytest.approx([0.4] * 3)


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_export_loads_in_saelens(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    if arch == "topk":
        model = TopKSAE([TopKConfig(d_in=16, d_sae=48, k=5, seed=3)])
    else:
        model = StandardSAE([StandardConfig(d_in=16, d_sae=48, seed=3)])
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    export_saelens(model, 0, tmp_path / "sae", {"hook_name": "x"}, sparsity=torch.full((48,), -2.0))
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    x = torch.randn(20, 16) + 1.0
    with torch.no_grad():
        ours = model.encode(x)[0]
        theirs = sae.encode(x)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(theirs), model.decode(ours.unsqueeze(0))[0], atol=1e-5, rtol=1e-5)
    assert np.isclose(json.loads((tmp_path / "sae" / "cfg.json").read_text())["d_sae"], 48)


@pytest.mark.slow  # a whole sweep twice, or a real training process
def test_pipeline_train_cli_exports(tmp_path, cli, importable):
    import subprocess
    import sys

    from tests.cli import ROOT

    sparse_cache(tmp_path / "c")
    (tmp_path / "mine.py").write_text(
        "from trainer.registry import register_architecture\n"
        "from trainer.sae_topk import TopKSAE\n"
        "@register_architecture('mine')\n"
        "class Mine(TopKSAE):\n    pass\n")
    importable(tmp_path)
    args = ["train", "--cache", tmp_path / "c", "--arch", "mine", "--import", "mine", "--d-sae", "128", "--k", "3",
            "--lr", "3e-3", "--batch-size", "256", "--out", tmp_path / "run"]
    code, err, out = cli(*args, "--tokens", "60000", "--no-wandb")
    assert code == 0, err[-2000:]
    assert "exported to" in out
    run = tmp_path / "run" / "mine-d128-k3"
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 128 and cfg["metadata"]["hook_name"] == "x"
    assert cfg["metadata"]["cache_manifest_hash"] and cfg["metadata"]["training_architecture"] == "mine"
    code, err, _ = cli(*args, "--tokens", "60000")
    assert code == 2 and "holds a checkpoint of an earlier run; pass --resume" in err
    # W&B with no key runs offline: its files land in the run's folder, nothing is sent. A process of its
    # own, W&B's service and output hooks stay out of the test's.
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    more = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args), "--tokens", "90000", "--resume"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-2000:]
    assert list((run / "wandb").glob("offline-run-*")), sorted(p.name for p in run.iterdir())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 352 and steps == sorted(steps)  # ceil(90000 / 256): continued, not restarted
    code, err, _ = cli("train", "--cache", tmp_path / "c", "--arch", "topkk", "--out", tmp_path / "r2")
    assert code == 2 and "unknown architecture 'topkk'; registered:" in err
    code, err, _ = cli("train", "--cache", tmp_path / "c", "--k", "500", "--d-sae", "128", "--batch-size", "256",
                       "--out", tmp_path / "r3")
    assert code == 2 and "k = 500 must be between 1 and d_sae = 128" in err


@pytest.mark.parametrize("arch", ["topk", "standard", "standard-target"])
def test_stopped_and_resumed_run_equals_straight_run(tmp_path, arch):
    """A run stopped after 70 of 150 steps and resumed from its checkpoint ends with bit-identical
    weights, optimizer state and dead-latent counters; with a target L0, the same coefficient and
    controller state (trainer.target_l0)."""
    sparse_cache(tmp_path / "c", rows=8000)

    def make():
        if arch == "topk":
            return TopKSAE([TopKConfig(d_in=32, d_sae=64, k=3, seed=0, dead_tokens_threshold=2000, initial_k=12,
                                       k_anneal_steps=90)])
        return StandardSAE([StandardConfig(d_in=32, d_sae=64, l1_coefficient=0.5, l1_warmup_steps=40)])

    loop = LoopConfig(lr=3e-3, lr_warmup_steps=10, lr_decay="cosine", total_steps=150, log_every=1000,
                      target_l0=4.0 if arch == "standard-target" else None)
    conf = {"arch": arch, "lr": 3e-3}

    def loader():  # 150 steps of 256 cross an epoch boundary (8000 rows)
        return ActivationLoader(tmp_path / "c", batch_size=256, tokens=256 * 150, seed=5)

    straight = make()
    train_stack(straight, loader(), loop, log=None, run_dir=tmp_path / "a", config=conf)
    first = make()
    train_stack(first, loader(), loop, log=None, run_dir=tmp_path / "b", max_steps=70, config=conf)
    resumed = make()  # a new process would start from fresh weights: the checkpoint replaces them
    train_stack(resumed, loader(), loop, log=None, run_dir=tmp_path / "b", config=conf)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    from safetensors.torch import load_file

    oa = load_file(str(tmp_path / "a" / "checkpoint" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "b" / "checkpoint" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    sa, sb = (json.loads((tmp_path / d / "checkpoint" / "state.json").read_text()) for d in "ab")
    assert sa.get("target_l0") == sb.get("target_l0") and ("target_l0" in sa) == (arch == "standard-target")
    with pytest.raises(Exception, match=r"checkpoint in .* is from another config \(lr: checkpoint 0.003, now 0.01\)"):
        train_stack(make(), loader(), loop, log=None, run_dir=tmp_path / "b", config={"arch": arch, "lr": 1e-2})


def test_a_run_resumed_off_the_logging_grid_logs_the_fractions_of_a_straight_run(tmp_path):
    """The dead/dense fractions of a logging window count the steps before a checkpoint taken in the
    middle of it (Ctrl-C stops anywhere): the window's counts are part of the checkpoint."""
    sparse_cache(tmp_path / "c", rows=4000)

    def run(name: str, **kw) -> list[tuple]:
        (tmp_path / name).mkdir(exist_ok=True)
        metrics = tmp_path / name / "metrics.jsonl"
        loop = LoopConfig(lr=3e-3, total_steps=60, log_every=20, metrics_path=str(metrics))
        loader = ActivationLoader(tmp_path / "c", batch_size=64, tokens=64 * 60, seed=1)
        train_stack(TopKSAE([TopKConfig(d_in=32, d_sae=256, k=2)]), loader, loop, log=None, run_dir=tmp_path / name,
                    **kw)
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        return [(m["step"], m["dead_fraction"], m["dense_fraction"]) for m in lines]

    straight = run("a")
    run("b", max_steps=30)
    assert run("b") == straight
    assert len({m[1][0] for m in straight}) > 1  # the fractions move: the comparison can tell


def test_tokens_per_s_is_the_current_speed_not_the_average_since_the_start():
    """A run that slows down says so at once: each line's tokens/s counts the steps since the last line."""
    import time

    batches = sparse_batches(20, 100)

    def slow_second_half():
        for i, b in enumerate(batches):
            if i >= 10:
                time.sleep(0.05)
            yield b

    lines = []
    train_stack(TopKSAE([TopKConfig(d_in=32, d_sae=64, k=3)]), slow_second_half(),
                LoopConfig(lr=3e-3, total_steps=20, log_every=10), log=lambda m: lines.append(dict(m)))
    assert [m["step"] for m in lines] == [10, 20]
    assert lines[1]["tokens_per_s"] <= 10 * 100 / (10 * 0.05)  # steps 11-20 took >= 0.5 s for 1,000 rows
    assert lines[0]["tokens_per_s"] > 2 * lines[1]["tokens_per_s"]


def test_malloc_tuning_applies_on_glibc(monkeypatch):
    import platform

    from pipeline.malloc import tune_malloc

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("PIPELINE_NO_MALLOC_TUNING", raising=False)
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_malloc() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4294967296")
    assert tune_malloc() is False  # the user's own setting wins


class NaNAfter(TopKSAE):
    """TopK whose loss turns NaN for the runs in `bad` from step `at` on (a diverging run)."""

    def __init__(self, cfgs, bad, at):
        super().__init__(cfgs)
        self.bad, self.at, self.step = bad, at, 0

    def on_step(self, step, total_steps):
        super().on_step(step, total_steps)
        self.step = step

    def forward(self, x):
        out = super().forward(x)
        if self.step >= self.at:
            poison = torch.zeros(self.n_runs)
            poison[self.bad] = float("nan")
            out["loss"] = out["loss"] + poison
        return out


def data(n=60, batch=128, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=g) * torch.linspace(0.3, 2, d) + 1.0 for _ in range(n)]


def test_nan_run_is_frozen_while_the_others_go_on():
    cfgs = [TopKConfig(d_in=16, d_sae=32, k=4, seed=s) for s in (0, 1)]
    loop = LoopConfig(lr=1e-2, log_every=10, init_scale_search=False)
    batches = data()
    stacked = NaNAfter(cfgs, bad=[1], at=25)
    seen = []
    last = train_stack(stacked, batches, loop, log=seen.append)
    assert last["failed"] == [1] and seen[1]["failed"] == [] and seen[2]["failed"] == [1]
    # Run 0 is exactly what it would be alone; run 1 stopped at its weights after step 25 (24 updates).
    alone = TopKSAE([cfgs[0]])
    train_stack(alone, batches, loop, log=None)
    torch.testing.assert_close(stacked.W_dec[0], alone.W_dec[0], rtol=1e-5, atol=1e-6)
    stopped = TopKSAE([cfgs[1]])
    train_stack(stopped, batches[:25], loop, log=None)
    torch.testing.assert_close(stacked.W_enc[1], stopped.W_enc[0], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(stacked.W_enc).all()


def test_all_runs_diverged_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from trainer.train import RunDiverged

    model = NaNAfter([TopKConfig(d_in=16, d_sae=32, k=4)], bad=[0], at=13)
    loop = LoopConfig(lr=1e-2, log_every=5, init_scale_search=False)
    with pytest.raises(RunDiverged, match=r"NaN/Inf by step 15 .*last good checkpoint is in"):
        train_stack(model, data(), loop, log=None, run_dir=tmp_path, checkpoint_every=4)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 12 and state["failed"] == []
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "checkpoint" / "model.safetensors")).values())


def test_mixing_buffer_serves_every_row_once_shuffled():
    from trainer.train import mixing_buffer

    stream = [torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32).view(-1, 1) for i in range(20)]
    out = list(mixing_buffer(stream, buffer_size=400, batch_size=64, seed=1))
    rows = torch.cat(out).flatten()
    assert sorted(rows.tolist()) == list(range(2000))
    assert all(len(b) == 64 for b in out[:-1])
    first = out[0].flatten()
    assert first.max() - first.min() > 200  # rows from different stream chunks meet
    assert not torch.equal(rows, torch.arange(2000.0))
    with pytest.raises(Exception, match="at least twice batch_size"):
        list(mixing_buffer(stream, buffer_size=100, batch_size=64))


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_init_scale_search_lowers_the_initial_mse(arch):
    from trainer.init import search_init_scale_

    x = data(n=1, batch=512)[0] * 5
    make = (lambda: TopKSAE([TopKConfig(d_in=16, d_sae=64, k=8, seed=s) for s in (0, 1)])) if arch == "topk" else \
        (lambda: StandardSAE([StandardConfig(d_in=16, d_sae=64, seed=s) for s in (0, 1)]))
    plain, searched = make(), make()
    for m in (plain, searched):
        m.init_b_dec(x, "mean")
    scales = search_init_scale_(searched, x)
    with torch.no_grad():
        before, after = plain(x)["mse"], searched(x)["mse"]
    assert scales.shape == (2,) and (after < 0.9 * before).all(), (before, after)
    if arch == "topk":  # the decoder stays unit-norm; the scale went into the encoder
        torch.testing.assert_close(searched.W_dec.norm(dim=-1), torch.ones(2, 64))


def test_k_annealing_goes_from_initial_k_to_k():
    model = TopKSAE([TopKConfig(d_in=16, d_sae=64, k=4, initial_k=20, k_anneal_steps=10),
                     TopKConfig(d_in=16, d_sae=64, k=6, seed=1)])
    x = data(n=1)[0]
    l0 = []
    for step in (0, 5, 10, 50):
        model.on_step(step, None)
        with torch.no_grad():
            l0.append(model(x)["l0"].tolist())
    assert [r[0] for r in l0] == [20, 12, 4, 4] and all(r[1] == 6 for r in l0)
    with pytest.raises(Exception, match="initial_k = 2 must be between k = 4"):
        TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4, initial_k=2))


def test_snapshot_steps_spacing():
    from trainer.run import snapshot_steps

    assert snapshot_steps(1000, 3, "linear") == [250, 500, 750]
    log = snapshot_steps(1000, 3, "log")
    assert log == [6, 32, 178] and snapshot_steps(1000, 0, "log") == []
    with pytest.raises(Exception, match="use log or linear"):
        snapshot_steps(10, 2, "cubic")


def test_export_folds_the_input_scale(tmp_path):
    from trainer.export import load_saelens

    model = TopKSAE([TopKConfig(d_in=16, d_sae=48, k=5, seed=3)])
    x = data(n=1)[0] * 40
    c = 0.05  # the loader's normalisation factor: the SAE was trained on c * x
    model.init_b_dec(c * x)
    export_saelens(model, 0, tmp_path / "sae", {}, input_scale=c)
    weights, _ = load_saelens(tmp_path / "sae")
    raw = TopKSAE([TopKConfig(d_in=16, d_sae=48, k=5)])
    raw.load_run(0, weights, {})
    with torch.no_grad():
        torch.testing.assert_close(raw.encode(x), model.encode(c * x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(raw.decode(raw.encode(x)), model.decode(model.encode(c * x)) / c,
                                   rtol=1e-4, atol=1e-4)


def test_run_train_eval_snapshots_init_from_and_bad_d_in(tmp_path):
    from pipeline.errors import PipelineError
    from trainer.run import TrainConfig, run_train

    sparse_cache(tmp_path / "c", rows=12_000, eval_rows=4000)
    base = dict(cache=str(tmp_path / "c"), out=str(tmp_path / "runs"), d_sae=64, k=4, batch_size=256, tokens=256 * 60,
                log_every=10, eval_every=20, n_snapshots=2, snapshot_spacing="linear", wandb=False, normalize=True)
    metrics = run_train(TrainConfig(**base))
    run = tmp_path / "runs" / "topk-d64-k4"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval_explained_variance" in lines[1] and "eval_explained_variance" not in lines[0]
    assert {"dense_fraction", "aux_loss", "mse", "l0"} <= set(lines[0])
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [256 * 20, 256 * 40]
    assert metrics["eval_l0"][0] == pytest.approx(4.0) and metrics["eval_explained_variance"][0] > 0.5
    # The export reads raw activations (the loader's normalisation is folded in) and continues training.
    cont = run_train(TrainConfig(**{**base, "name": "cont", "init_from": str(run), "tokens": 256 * 10,
                                    "n_snapshots": 0, "eval_every": 0, "lr_warmup_steps": 0}))
    assert cont["eval_explained_variance"][0] > metrics["eval_explained_variance"][0] - 0.05
    with pytest.raises(PipelineError, match=r"has d_sae = 64, but this run has d_sae = 128; pass --d-sae 64"):
        run_train(TrainConfig(**{**base, "name": "bad", "init_from": str(run), "d_sae": 128}))
    other = tmp_path / "wide"
    w = CacheWriter(other, {"x": 48}, WriterConfig())
    w.put(ActivationBlock({"x": torch.randn(3000, 48)}))
    w.close()
    with pytest.raises(PipelineError, match=r"has d_in = 32, but this run has d_in = 48 \(the cache's hook width\)"):
        run_train(TrainConfig(**{**base, "cache": str(other), "name": "bad2", "init_from": str(run)}))


def test_default_schedule_is_a_warm_up_of_5_percent_then_constant_then_linear_decay():
    cfg = LoopConfig(total_steps=200)  # 10 warm-up steps, decay over the last 40
    assert [lr_factor(s, cfg) for s in (0, 4, 9, 100, 160)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    assert lr_factor(180, cfg) == pytest.approx(0.5) and lr_factor(200, cfg) == 0.0
    assert lr_factor(0, LoopConfig()) == 1.0  # a run of unknown length: no warm-up, no decay


def test_the_loop_and_pipeline_train_share_their_defaults():
    """A field of LoopConfig that TrainConfig has too (lr, schedule, init...) defaults to the same value,
    so the library loop trains as `pipeline train` does."""
    from pipeline.cli_options import config_fields

    train = {f.name: f.default for f in config_fields("trainer.run", "TrainConfig")}
    loop = {f.name: f.default for f in config_fields("trainer.train", "LoopConfig")}
    shared = set(train) & set(loop)
    assert {"lr", "lr_warmup_steps", "lr_decay", "max_grad_norm", "b_dec_init", "precision"} <= shared
    assert {name: loop[name] for name in shared} == {name: train[name] for name in shared}
    assert LoopConfig().lr is None  # the source the test reads is the class Python builds


def test_default_lr_scales_with_the_width_and_a_given_lr_wins():
    """lr None is 3e-3 at d_sae 2048, times sqrt(2048 / d_sae); per run, a given lr replaces it."""
    from trainer.sae_topk import TopKConfig, TopKSAE
    from trainer.train import StackTrainer, default_lr

    assert default_lr(2048) == pytest.approx(3e-3) and default_lr(8192) == pytest.approx(1.5e-3)
    assert default_lr(512) == pytest.approx(6e-3)
    model = TopKSAE([TopKConfig(d_in=16, d_sae=512, k=4, seed=s) for s in range(2)])
    assert StackTrainer(model, LoopConfig()).opt.lr.tolist() == pytest.approx([6e-3, 6e-3])
    assert StackTrainer(model, LoopConfig(lr=[None, 1e-4])).opt.lr.tolist() == pytest.approx([6e-3, 1e-4])
    assert StackTrainer(model, LoopConfig(lr=2e-4)).opt.lr.tolist() == pytest.approx([2e-4, 2e-4])


def test_dead_latent_window_is_a_fortieth_of_the_run_at_most_10m():
    """`pipeline train` counts a TopK-family latent dead after 1/40 of the run's tokens (10M at
    most); arch_options still set it; a config built by hand without one gets Gao et al.'s 10M."""
    from trainer.run import TrainConfig, run_config
    from trainer.sae_topk import TopKConfig, TopKSAE

    for arch in ("topk", "batchtopk", "matryoshka"):
        assert run_config(TrainConfig(arch=arch, tokens=1_000_000), d_in=16).dead_tokens_threshold == 25_000
        assert run_config(TrainConfig(arch=arch, tokens=10**9), d_in=16).dead_tokens_threshold == 10_000_000
    given = TrainConfig(tokens=1_000_000, arch_options={"dead_tokens_threshold": 5})
    assert run_config(given, d_in=16).dead_tokens_threshold == 5
    assert not hasattr(run_config(TrainConfig(arch="standard"), d_in=16), "dead_tokens_threshold")
    model = TopKSAE([TopKConfig(d_in=16, d_sae=64, k=4), TopKConfig(d_in=16, d_sae=64, k=4, dead_tokens_threshold=7)])
    assert model.dead_tokens_threshold.tolist() == [10_000_000, 7]


def test_shipped_train_config_matches_the_defaults_and_flags_win():
    from pathlib import Path

    from pipeline.config import build_config
    from trainer.run import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "train_default.toml"
    assert build_config(TrainConfig, path, {}, section="train") == TrainConfig()
    cfg = build_config(TrainConfig, path, {"d_sae": 4096, "wandb": False, "k": None}, section="train")
    assert cfg.d_sae == 4096 and cfg.wandb is False and cfg.k == 32


@pytest.mark.parametrize("arch", ["standard", "gated"])
def test_init_from_a_saelens_saved_sae_without_b_dec_on_the_input(tmp_path, arch):
    """An SAE SAELens saved with apply_b_dec_to_input = false loads into ours with the same encode/decode."""
    sae_lens = pytest.importorskip("sae_lens")
    from trainer.export import init_from
    from trainer.registry import get_architecture

    cfg_cls = {"standard": sae_lens.StandardSAEConfig, "gated": sae_lens.GatedSAEConfig}[arch]
    sae = sae_lens.SAE.from_dict(cfg_cls(d_in=16, d_sae=40, apply_b_dec_to_input=False).to_dict())
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
    sae.save_model(str(tmp_path / "theirs"))
    ours = get_architecture(arch)([get_architecture(arch).config_class(d_in=16, d_sae=40)])
    init_from(ours, tmp_path / "theirs")
    x = torch.randn(30, 16) + 0.5
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x)[0], sae.encode(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.decode(ours.encode(x))[0], sae.decode(sae.encode(x)), rtol=1e-4, atol=1e-5)
