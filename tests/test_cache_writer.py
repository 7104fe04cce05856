"""Stage 1 on language models: stored rows equal a fresh forward pass; resume; bad input."""

from __future__ import annotations

import json
import platform
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_writer.run import CacheConfig, run_cache
from cache_writer.tiny_model import load_tiny_model
from pipeline.errors import PipelineError
from pipeline.manifest import read_manifest
from pipeline.reader import Cache
from pipeline.verify import verify_cache
from tests.builders import small_corpus, tiny_opt
from tests.cli import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_post"
TOL = {"float32": dict(atol=1e-4, rtol=1e-4), "float16": dict(atol=2e-2, rtol=2e-3),
       "bfloat16": dict(atol=1e-1, rtol=1e-2)}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in this process (tests.cli.run_pipeline), as a finished process's record."""
    code, err, out = run_pipeline(*args)
    if check and code != 0:
        raise AssertionError(err[-2000:])
    return subprocess.CompletedProcess(["pipeline", *args], code, out, err)


def sample_rows(cache: Cache, split: str, n: int, seed: int = 0):
    """Random (shard, row) picks with their token rows and the split-wide sequences table."""
    sequences = np.concatenate([cache.sequences(split, i) for i in range(len(cache.shards(split)))])
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(n):
        shard = int(rng.integers(len(cache.shards(split))))
        row = int(rng.integers(cache.shards(split)[shard]["rows"]))
        picks.append((shard, row, cache.tokens(split, shard)[row]))
    return picks, sequences


def assert_rows_match_model(path: Path, hooks: list[str], n: int = 24, tol: dict | None = None) -> None:
    cache = Cache(path)
    model = load_tiny_model()
    for split in ("train", "eval"):
        if not cache.shards(split):
            continue
        picks, sequences = sample_rows(cache, split, n)
        for shard, row, (tok, seq, pos) in picks:
            assert sequences[seq, pos] == tok
            _, acts = model.run_with_cache(torch.tensor(sequences[seq][None], dtype=torch.long))
            for hook in hooks:
                want = acts[hook][0, pos].flatten()
                got = cache.activations_tensor(hook, split, shard)[row].float()
                torch.testing.assert_close(got, want.to(got.dtype if cache.dtype != "float32" else want.dtype).float(),
                                           **(tol or TOL[cache.dtype]))


@pytest.mark.parametrize("fmt,dtype", [("zarr", "float32"), ("arrow", "float32"), ("zarr", "bfloat16"),
                                       ("arrow", "float16")])
def test_rows_equal_run_with_cache(tmp_path, fmt, dtype):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    m = run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=12_000, hooks=hooks, format=fmt, dtype=dtype,
                              shard_mb=0.5, eval_fraction=0.3, dataset=small_corpus(tmp_path / "docs")),
                  progress=False)
    assert m["complete"] and verify_cache(tmp_path / "c")[0] == []
    assert m["splits"]["train"]["rows"] > 0 and m["splits"]["eval"]["rows"] > 0
    assert_rows_match_model(tmp_path / "c", hooks)


@pytest.fixture(scope="module")
def readme_cache(tmp_path_factory) -> tuple[Path, str]:
    """The README's small cache, written once for the tests that read it: (path, what the command printed)."""
    path = tmp_path_factory.mktemp("readme") / "small"
    out = cli("cache", "--model", "tiny", "--tokens", "20000", "--format", "zarr", "--out", str(path))
    return path, out.stdout


def test_cli_default_command_and_info(readme_cache):
    path, stdout = readme_cache
    assert "wrote" in stdout
    m = read_manifest(path)
    assert list(m["hooks"]) == [HOOK]  # the middle layer's residual stream by default
    assert m["provenance"]["dataset"]["name"] == "python-stdlib"
    assert m["provenance"]["dataset"]["revision"]["python_version"] == platform.python_version()
    assert m["hooks"][HOOK]["shape"] == [128]
    assert m["progress"]["units"] * 128 >= 20000
    # BOS positions hold no rows by default
    t = Cache(path).tokens("train", 0)
    assert (t[:, 0] != 256).all() and (t[:, 2] > 0).all()
    info = cli("info", str(path))
    assert HOOK in info.stdout and "train" in info.stdout
    assert cli("verify", str(path)).stdout.startswith("OK")


def test_attention_hooks_flattened_and_per_head(tmp_path):
    hooks = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_z:2"]
    run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=4000, hooks=hooks, eval_fraction=0.0), progress=False)
    cache = Cache(tmp_path / "c")
    assert cache.hooks == {"blocks.1.attn.hook_z": 128, "blocks.1.attn.hook_z:2": 32}
    flat = cache.activations_tensor("blocks.1.attn.hook_z", "train", 0)
    head = cache.activations_tensor("blocks.1.attn.hook_z:2", "train", 0)
    torch.testing.assert_close(flat[:, 64:96], head)  # head 2 of 4, d_head 32
    model = load_tiny_model()
    seqs = cache.sequences("train", 0)
    tok, seq, pos = cache.tokens("train", 0)[5]
    _, acts = model.run_with_cache(torch.tensor(seqs[seq][None], dtype=torch.long))
    torch.testing.assert_close(flat[5], acts["blocks.1.attn.hook_z"][0, pos].flatten(), atol=1e-4, rtol=1e-4)


def test_hugging_face_module_path(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=48, n_layer=3, n_head=4))
    model.save_pretrained(tmp_path / "gpt2-tiny")
    run_cache(CacheConfig(out=str(tmp_path / "c"), model=str(tmp_path / "gpt2-tiny"), tokenizer="bytes",
                          hooks=["transformer.h.1"], context_size=64, tokens=3000, eval_fraction=0.0),
              progress=False)
    cache = Cache(tmp_path / "c")
    assert cache.hooks == {"transformer.h.1": 48}
    picks, sequences = sample_rows(cache, "train", 10)
    model.eval()
    for shard, row, (tok, seq, pos) in picks:
        with torch.no_grad():
            hidden = model(torch.tensor(sequences[seq][None], dtype=torch.long), output_hidden_states=True).hidden_states
        # hidden_states[i + 1] is the output of block i
        torch.testing.assert_close(cache.activations_tensor("transformer.h.1", "train", shard)[row],
                                   hidden[2][0, pos], atol=1e-4, rtol=1e-4)


def test_module_with_flattened_tokens(tmp_path):
    """OPT's fc2 outputs (batch * seq, d): cached as (batch, seq, d), row for row."""
    hook = "model.decoder.layers.1.fc2"
    run_cache(CacheConfig(out=str(tmp_path / "c"), model=str(tiny_opt(tmp_path / "opt")), tokenizer="bytes",
                          hooks=[hook], context_size=32, batch_size=4, tokens=1000, eval_fraction=0.0),
              progress=False)
    cache = Cache(tmp_path / "c")
    assert cache.hooks == {hook: 32}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "opt").eval()
    seen = []
    model.get_submodule(hook).register_forward_hook(lambda m, i, o: seen.append(o))
    picks, sequences = sample_rows(cache, "train", 10)
    for shard, row, (tok, seq, pos) in picks:
        seen.clear()
        with torch.no_grad():
            model(torch.tensor(sequences[seq][None], dtype=torch.long))
        torch.testing.assert_close(cache.activations_tensor(hook, "train", shard)[row], seen[0][pos],
                                   atol=1e-5, rtol=1e-5)


def test_module_output_of_another_shape_is_named():
    from cache_writer.model_adapter import per_token

    with pytest.raises(PipelineError, match=r"hook lm.pool: the module's output has shape \(2, 8\), not \(batch, seq, d\)"):
        per_token(torch.zeros(2, 8), 2, 16, "lm.pool")


def test_hugging_face_load_does_not_warn_about_torch_dtype(tmp_path):
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from cache_writer.model_adapter import load_model

    tiny_opt(tmp_path / "opt")
    hf_logging.warning_once.cache_clear()  # a message transformers already gave once would hide here
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.WARNING)  # importing transformer_lens turns transformers' warnings off
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapter = load_model(str(tmp_path / "opt"), dtype="float16")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert next(adapter.model.parameters()).dtype == torch.float16
    assert not [m for m in records + [str(w.message) for w in caught] if "torch_dtype" in m]


def test_pyproject_license_is_an_spdx_string():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"  # a table makes setuptools print a deprecation banner


def _rows_by_key(path: Path) -> dict:
    cache = Cache(path)
    out = {}
    for split in ("train", "eval"):
        for i in range(len(cache.shards(split))):
            out[(split, i)] = (cache.tokens(split, i).copy(), cache.activations(HOOK, split, i).copy(),
                               cache.sequences(split, i).copy())
    return out


def _assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = _rows_by_key(a), _rows_by_key(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        for x, y in zip(ra[key], rb[key]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    args = ["cache", "--tokens", "160000", "--shard-mb", "1", "--batch-size", "16"]
    cli(*args, "--out", str(tmp_path / "ref"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--out", str(tmp_path / "c")], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a few shard groups are committed
        try:
            if json.loads((tmp_path / "c" / "manifest.json").read_text())["progress"]["groups"] >= 3:
                break
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = read_manifest(tmp_path / "c")
    assert not m["complete"] and m["progress"]["groups"] >= 3
    assert m["progress"]["units"] < read_manifest(tmp_path / "ref")["progress"]["units"]
    assert verify_cache(tmp_path / "c")[0] == []
    cli(*args, "--out", str(tmp_path / "c"), "--resume")
    assert read_manifest(tmp_path / "c")["complete"]
    _assert_same_cache(tmp_path / "ref", tmp_path / "c")


@pytest.mark.slow  # a cache written, then extended
def test_extend_complete_cache(tmp_path):
    base = dict(shard_mb=0.25, batch_size=8)
    run_cache(CacheConfig(out=str(tmp_path / "ref"), tokens=16_000, **base), progress=False)
    run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=7_000, **base), progress=False)
    m = run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=16_000, resume=True, **base), progress=False)
    assert m["complete"]
    _assert_same_cache(tmp_path / "ref", tmp_path / "c")
    assert m["hooks"] == read_manifest(tmp_path / "ref")["hooks"]  # statistics bit for bit


def test_text_files_and_pretokenized_dataset(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 8)
    m = run_cache(CacheConfig(out=str(tmp_path / "c"), dataset=str(docs), tokens=4000, eval_fraction=0.1),
                  progress=False)
    assert m["provenance"]["dataset"]["name"] == str(docs.resolve()) and m["splits"]["train"]["rows"] > 0
    seqs = Cache(tmp_path / "c").sequences("train", 0)
    assert bytes(int(t) for t in seqs[0][1:40] if t != 256).decode().startswith("document")
    cli("pretokenize", "--dataset", str(docs), "--out", str(tmp_path / "pre"), "--context-size", "128",
        "--eval-fraction", "0.1")
    m2 = run_cache(CacheConfig(out=str(tmp_path / "c2"), dataset=str(tmp_path / "pre"), tokens=4000,
                               eval_fraction=0.1), progress=False)
    assert m2["config"]["source"]["column"] == "input_ids"
    # the same sequences, split the same way, whether tokenized on the fly or once ahead
    np.testing.assert_array_equal(Cache(tmp_path / "c").sequences("train", 0), Cache(tmp_path / "c2").sequences("train", 0))
    assert m2["splits"]["eval"]["sequences"] == m["splits"]["eval"]["sequences"]


# ----------------------------------------------------------------- the eval split


def _sequences(dataset: str | None, fraction: float, n: int, context_size: int = 128) -> list[tuple[str, list]]:
    """The first `n` (split, token ids) sequences `pipeline cache` would write, byte tokenizer."""
    import itertools

    from cache_writer.byte_tokenizer import ByteTokenizer
    from cache_writer.run import special_ids
    from cache_writer.text_source import iter_sequences, open_documents

    tok = ByteTokenizer()
    bos, sep, _ = special_ids(tok)
    return list(itertools.islice(iter_sequences(open_documents(dataset), tok, context_size, fraction, bos, sep), n))


def _splits(dataset: str | None, fraction: float, n: int) -> list[str]:
    return [split for split, _ in _sequences(dataset, fraction, n)]


@pytest.mark.parametrize("fraction,n", [(0.05, 157), (0.05, 2000), (0.2, 1954), (0.5, 300)])
def test_eval_share_is_the_fraction_on_small_caches(fraction, n):
    """20,000 tokens at 0.05 once gave 0 eval rows, 250,000 at 0.2 gave 51%: whole stdlib files by hash."""
    splits = _splits(None, fraction, n)
    assert abs(splits.count("eval") - fraction * n) <= 2  # within two sequences of the fraction


def test_eval_tokens_stay_within_one_piece_of_their_target():
    from cache_writer.eval_split import EvalSplitter

    rng = np.random.default_rng(0)
    for fraction in (0.01, 0.05, 0.3, 0.7):
        splitter = EvalSplitter(fraction, minimum=128)
        for i, n in enumerate(rng.integers(1, 129, size=3000)):
            splitter.split(f"doc{i}", int(n))
            assert abs(splitter.held - splitter.target(splitter.seen)) < 128


def test_a_single_text_file_gets_an_eval_split(tmp_path):
    from cache_writer.stdlib_corpus import stdlib_files

    text = tmp_path / "one.txt"
    text.write_bytes(b"".join(p.read_bytes() for _, p in stdlib_files()[:40])[:60_000])
    splits = _splits(str(text), 0.05, 400)
    assert len(splits) == 400 and abs(splits.count("eval") - 20) <= 2


def test_smallest_caches_have_both_splits(tmp_path):
    assert _splits(None, 0.05, 2) == ["train", "eval"]  # each split gets one context first
    assert _splits(None, 0.9, 2) == ["eval", "train"]
    with pytest.raises(PipelineError, match=r"--tokens 100 is 1 sequence of 128 tokens: too few for a train and "
                                            r"an eval split; cache at least 256 tokens, or pass --eval-fraction 0"):
        run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=100), progress=False)
    assert not (tmp_path / "c").exists()


def test_pieces_of_one_split_pack_as_the_whole_document():
    """Cutting documents into pieces changes nothing where they all stay in one split."""
    import itertools

    from cache_writer.byte_tokenizer import ByteTokenizer
    from cache_writer.packing import pack_sequences
    from cache_writer.stdlib_corpus import stream_stdlib_dataset

    docs = (ByteTokenizer().encode(row["text"]) for row in stream_stdlib_dataset())
    whole = list(itertools.islice(pack_sequences(docs, 64, 256, 256), 3000))
    assert _sequences(None, 0.0, 3000, context_size=64) == [("train", row) for row in whole]


def test_readme_small_cache_has_eval_rows_and_says_tokens_count_both(readme_cache):
    """`--tokens 20000` runs 157 whole contexts of 128, 20,096 tokens: said where the count is printed
    (before the progress that counts them, in the last line) and in --help."""
    path, stdout = readme_cache
    m = read_manifest(path)
    train, held = m["splits"]["train"]["rows"], m["splits"]["eval"]["rows"]
    assert abs(held / (train + held) - 0.05) < 0.01
    assert m["progress"]["units"] == 157 and sum(s["sequences"] for s in m["splits"].values()) == 157
    rounded = "20,096 tokens (--tokens 20,000 rounded up to whole sequences)"
    assert f"caching 157 sequences of 128 tokens: {rounded}" in stdout
    assert (f"157 sequences of 128 tokens = {rounded}, train and eval together: {train:,} train rows + {held:,} "
            "eval rows (special-token positions store none)") in stdout.splitlines()[-1]
    import inspect

    from pipeline.cli import cache

    help_text = inspect.signature(cache).parameters["tokens"].default.help
    assert "train and eval together" in help_text and "rounded up to whole sequences" in help_text


# ----------------------------------------------------------------- bad input, one line each


def test_unknown_hook_lists_nearest(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown hook 'blocks.0.hook_resid_pots'; nearest valid hooks: "
                                            r"blocks.0.hook_resid_post"):
        run_cache(CacheConfig(out=str(tmp_path / "c"), hooks=["blocks.0.hook_resid_pots"]), progress=False)
    out = cli("cache", "--hook", "blocks.9.hook_resid_post", "--out", str(tmp_path / "d"), check=False)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown hook") and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("field,value", [("tokens", 0), ("tokens", -5), ("batch_size", 0), ("context_size", -1),
                                         ("shard_mb", 0.0), ("eval_fraction", 1.0), ("eval_fraction", -0.1)])
def test_non_positive_sizes_are_refused(tmp_path, field, value):
    with pytest.raises(PipelineError, match=f"--{field.replace('_', '-')} must be "):
        run_cache(CacheConfig(out=str(tmp_path / "c"), **{field: value}), progress=False)
    assert not (tmp_path / "c").exists()
    from pipeline.writer import WriterConfig

    with pytest.raises(PipelineError, match=r"--shard-mb must be a number > 0, got -1"):
        WriterConfig(shard_mb=-1)


def test_cli_refuses_zero_tokens_in_one_line(tmp_path):
    """`--tokens 0` once wrote an empty cache marked complete."""
    out = cli("cache", "--tokens", "0", "--out", str(tmp_path / "c"), check=False)
    assert out.returncode == 2 and out.stderr == "error: --tokens must be a number > 0, got 0\n"
    assert not (tmp_path / "c").exists()


def test_unknown_model(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown model 'gtp2'.*did you mean: .*gpt2"):
        run_cache(CacheConfig(out=str(tmp_path / "c"), model="gtp2"), progress=False)


def test_missing_dataset_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["some text"] * 4}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(PipelineError, match=r"has no 'text', 'input_ids' or 'tokens' column \(it has: body\); "
                                            r"name one with --column"):
        run_cache(CacheConfig(out=str(tmp_path / "c"), dataset=str(tmp_path / "ds")), progress=False)
    with pytest.raises(PipelineError, match=r"has no column 'content'; its columns are: body"):
        run_cache(CacheConfig(out=str(tmp_path / "c"), dataset=str(tmp_path / "ds"), column="content"),
                  progress=False)


def test_context_size_above_model(tmp_path):
    with pytest.raises(PipelineError, match=r"--context-size 512 is above model tiny's context of 256"):
        run_cache(CacheConfig(out=str(tmp_path / "c"), context_size=512), progress=False)


def test_resume_with_different_config_names_field(tmp_path):
    run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=2000), progress=False)
    with pytest.raises(PipelineError, match=r"config differs \(source.context_size: cache 128, now 64\)"):
        run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=4000, context_size=64, resume=True), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_cache_equals_model_rows(tmp_path, dtype):
    """On a GPU the writer copies blocks to pinned memory asynchronously; rows must still be right."""
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    m = run_cache(CacheConfig(out=str(tmp_path / "c"), tokens=20_000, hooks=hooks, device="cuda", dtype=dtype, eval_fraction=0.3, dataset=small_corpus(tmp_path / "docs"),
                              shard_mb=0.5, batch_size=16), progress=False)
    assert m["complete"] and verify_cache(tmp_path / "c")[0] == []
    # GPU kernels sum in another order than the CPU reference
    assert_rows_match_model(tmp_path / "c", hooks, tol=dict(atol=2e-3, rtol=2e-3) if dtype == "float32" else None)
    # statistics computed on the GPU equal those of the stored rows
    x = Cache(tmp_path / "c").read_split(hooks[0]).double()
    stats = m["hooks"][hooks[0]]["stats"]
    assert stats["count"] == x.shape[0]
    np.testing.assert_allclose(stats["mean"], x.mean(0).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean_norm"], x.norm(dim=1).mean().item(), rtol=1e-5)
    with pytest.raises(Exception, match="overflow float16"):
        from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig

        w = CacheWriter(tmp_path / "o", {"h": 4}, WriterConfig(dtype="float16"))
        w.put(ActivationBlock({"h": torch.full((2, 4), 1e6, device="cuda")}))
        w.close()


def test_positions_slice_and_toml_config(tmp_path):
    cfg = tmp_path / "cache.toml"
    cfg.write_text(f'[cache]\nout = "{tmp_path / "c"}"\ntokens = 3000\npositions = "4:20"\nformat = "arrow"\n'
                   'exclude_special_tokens = false\n')
    cli("cache", "--config", str(cfg), "--tokens", "2560")  # a flag overrides the file
    m = read_manifest(tmp_path / "c")
    assert m["backend"] == "arrow" and m["progress"]["units"] == 20
    tok = Cache(tmp_path / "c").tokens("train", 0)
    assert tok[:, 2].min() >= 4 and tok[:, 2].max() < 20
    # every sequence keeps exactly positions 4..19
    assert m["splits"]["train"]["rows"] + m["splits"]["eval"]["rows"] == 20 * 16
    bad = tmp_path / "bad.toml"
    bad.write_text('[cache]\ntokenz = 5\n')
    out = cli("cache", "--config", str(bad), "--out", str(tmp_path / "d"), check=False)
    assert out.returncode == 2 and "unknown field(s) tokenz" in out.stderr


def test_forward_stops_after_last_hooked_layer(tmp_path):
    from cache_writer.model_adapter import _tl_stop_layer, load_model

    assert _tl_stop_layer(["blocks.0.hook_resid_post"], 2) == 1
    assert _tl_stop_layer(["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre"], 4) == 2
    assert _tl_stop_layer(["blocks.1.hook_resid_post"], 2) is None  # the last block: run it all
    assert _tl_stop_layer(["ln_final.hook_normalized"], 2) is None
    adapter = load_model("tiny")
    called = []
    handle = adapter.model.blocks[1].register_forward_hook(lambda *a: called.append(1))
    adapter.run(torch.zeros(1, 4, dtype=torch.long), ["blocks.0.hook_resid_post"])
    handle.remove()
    assert called == []  # block 1 never ran
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=32, n_embd=16, n_layer=3, n_head=2)).save_pretrained(
        tmp_path / "m")
    hf = load_model(str(tmp_path / "m"))
    ran = []
    handle = hf.model.transformer.h[2].register_forward_hook(lambda *a: ran.append(1))
    out = hf.run(torch.zeros(1, 4, dtype=torch.long), ["transformer.h.0"])
    handle.remove()
    assert ran == [] and out["transformer.h.0"].shape == (1, 4, 16)
