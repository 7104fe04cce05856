"""Reading SAELens `CacheActivationsRunner` caches (pipeline/saelens_cache.py).

The main test makes a real cache with SAELens (the `test` extra installs `sae-lens`): the runner
is given our shipped tiny byte model (it only loads models by name, so its `load_model` is patched)
and a local pre-tokenized dataset, so nothing is downloaded. A second test builds the same layout by
hand with `datasets` (several hook columns, `save_to_disk(num_shards=3)`), which needs no SAELens.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.saelens_cache import SAELensCache, is_saelens_cache
from pipeline.writer import WriterConfig
from tests.synthetic import write_synthetic

HOOK = "blocks.0.hook_resid_post"
D = 128  # the tiny model's d_model
CONTEXT = 4
BATCH_PROMPTS = 250
BATCHES_PER_BUFFER = 5  # 1,250 contexts per SAELens buffer (= per Arrow file): record batches of 1,000 + 250
N_BUFFERS = 2
N_CONTEXTS = BATCH_PROMPTS * BATCHES_PER_BUFFER * N_BUFFERS
ITEMSIZE = {"float32": 4, "float16": 2}


@pytest.fixture(scope="module")
def tiny_model():
    from cache_writer.tiny_model import load_tiny_model

    return load_tiny_model()


@pytest.fixture(scope="module")
def input_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(N_CONTEXTS + 100, CONTEXT), dtype=np.int64)


@pytest.fixture(scope="module", params=["float32", "float16"])
def saelens_cache(request, tmp_path_factory, tiny_model, input_ids) -> tuple[Path, str]:
    """A cache written by SAELens's own CacheActivationsRunner, offline."""
    pytest.importorskip("sae_lens")
    import datasets
    import sae_lens.cache_activations_runner as car
    from sae_lens.config import CacheActivationsRunnerConfig

    dtype = request.param
    out = tmp_path_factory.mktemp(f"saelens-{dtype}") / "cache"
    tokens_per_buffer = BATCH_PROMPTS * BATCHES_PER_BUFFER * CONTEXT
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        # The runner loads its model by name (HookedTransformer.from_pretrained); hand it ours.
        mp.setattr(car, "load_model", lambda **kwargs: tiny_model)
        cfg = CacheActivationsRunnerConfig(
            dataset_path="local-tokens", model_name="tiny-stdlib-bytes", hook_name=HOOK, d_in=D,
            model_batch_size=BATCH_PROMPTS, context_size=CONTEXT,
            training_tokens=tokens_per_buffer * N_BUFFERS,
            # buffer_size_gb sets the tokens per buffer; each buffer becomes one Arrow file.
            buffer_size_gb=tokens_per_buffer * D * ITEMSIZE[dtype] / 1e9,
            new_cached_activations_path=str(out), dtype=dtype, device="cpu",
            shuffle=False, prepend_bos=False, streaming=False,
        )
        assert (cfg.n_buffers, cfg.n_seq_in_buffer) == (N_BUFFERS, BATCH_PROMPTS * BATCHES_PER_BUFFER)
        dataset = datasets.Dataset.from_dict({"input_ids": input_ids.tolist()})
        with warnings.catch_warnings():
            # SAELens warns that 2,600 contexts are "fewer samples" than 10,000 training tokens (it compares
            # rows with tokens), and about torch.tensor(tensor) copies.
            warnings.simplefilter("ignore", UserWarning)
            car.CacheActivationsRunner(cfg, override_dataset=dataset).run()
    return out, dtype


def _mapped_from(array: np.ndarray, file: Path) -> bool:
    """Whether `array`'s memory lies in a mapping of `file` (Linux: /proc/self/maps), i.e. zero-copy."""
    address = array.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(file.resolve()):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end:
                return True
    return False


def _check_stats(cache, hook: str, rows: np.ndarray) -> None:
    x = rows.astype(np.float64)
    stats = cache.hook_stats(hook)
    assert stats["count"] == len(x)
    np.testing.assert_allclose(stats["mean"], x.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-12)


def test_reads_a_real_saelens_cache(saelens_cache, tiny_model, input_ids, capsys) -> None:
    import datasets
    import torch

    path, dtype = saelens_cache
    assert is_saelens_cache(path)
    cache = SAELensCache(path)
    assert "no manifest" in capsys.readouterr().err  # stats are computed on open, and it says so

    assert cache.hooks == {HOOK: D}
    assert cache.dtype == dtype and cache.context_size == CONTEXT
    assert cache.rows("train") == N_CONTEXTS * CONTEXT
    # One Arrow file per SAELens buffer, each written as record batches of 1,000 + 250 contexts:
    # every record batch is a shard, so each one is a zero-copy view.
    assert [(s["file"], s["sequences"]) for s in cache.shards("train")] == [
        ("data-00000-of-00002.arrow", 1000), ("data-00000-of-00002.arrow", 250),
        ("data-00001-of-00002.arrow", 1000), ("data-00001-of-00002.arrow", 250),
    ]
    assert sum(s["rows"] for s in cache.shards("train")) == cache.rows("train")
    assert cache.shards("eval") == [] and cache.rows("eval") == 0

    parts = []
    for i, shard in enumerate(cache.shards("train")):
        a = cache.activations(HOOK, "train", i)
        assert a.shape == (shard["rows"], D) and a.dtype == np.dtype(dtype)
        assert not a.flags.writeable and _mapped_from(a, path / shard["file"])
        if getattr(a, "file_offset", None) is not None:  # a pipeline.backends.MappedRows: row 0's place in the file
            assert a.filename == str(path / shard["file"])
            on_disk = np.fromfile(a.filename, dtype=a.dtype, count=a.size, offset=a.file_offset)
            np.testing.assert_array_equal(on_disk.reshape(a.shape), a)
        parts.append(a)
    got = np.concatenate(parts)

    # Exactly what `datasets` reads back from the same directory...
    ds = datasets.load_from_disk(str(path)).with_format("numpy")[:]
    np.testing.assert_array_equal(got, ds[HOOK].reshape(-1, D))
    # ...in the order the contexts were fed (no on-disk shuffle)...
    np.testing.assert_array_equal(ds["token_ids"], input_ids[:N_CONTEXTS])
    # ...and the activations the model produces on them.
    with torch.no_grad():
        _, act_cache = tiny_model.run_with_cache(torch.from_numpy(input_ids[:N_CONTEXTS]), names_filter=[HOOK])
    expected = act_cache[HOOK].reshape(-1, D).numpy()
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=tol, atol=tol)

    _check_stats(cache, HOOK, got)

    with pytest.raises(PipelineError, match=f"'blocks.9.hook_nope' is not in .*; it has: {HOOK}"):
        cache.check_hook("blocks.9.hook_nope")
    with pytest.raises(PipelineError, match=f"it has: {HOOK}"):
        cache.activations("blocks.9.hook_nope", "train", 0)
    with pytest.raises(PipelineError, match="unknown split"):
        cache.shards("test")


HOOKS = {"blocks.0.hook_resid_post": 6, "blocks.1.hook_mlp_out": 3}


def test_hand_built_layout_with_several_hooks_and_files(tmp_path, capsys) -> None:
    """The SAELens layout by hand (no SAELens needed): two hook columns, three files via num_shards."""
    from datasets import Array2D, Dataset, Features, List, Value

    n, ctx = 37, 5
    rng = np.random.default_rng(1)
    acts = {h: rng.standard_normal((n, ctx, d)).astype(np.float32) for h, d in HOOKS.items()}
    features = Features({**{h: Array2D(shape=(ctx, d), dtype="float32") for h, d in HOOKS.items()},
                         "token_ids": List(Value("int32"), length=ctx)})
    tokens = rng.integers(0, 1000, size=(n, ctx)).astype(np.int32)
    Dataset.from_dict({**acts, "token_ids": tokens}, features=features).save_to_disk(str(tmp_path / "c"), num_shards=3)
    capsys.readouterr()

    cache = SAELensCache(tmp_path / "c", compute_stats=False)
    assert capsys.readouterr().err == ""  # no statistics pass yet
    assert cache.hooks == HOOKS and cache.dtype == "float32" and cache.rows() == n * ctx
    assert len({s["file"] for s in cache.shards()}) == 3
    for hook, d in HOOKS.items():
        got = np.concatenate([cache.activations(hook, "train", i) for i in range(len(cache.shards()))])
        np.testing.assert_array_equal(got, acts[hook].reshape(-1, d))
        _check_stats(cache, hook, got)
    assert "no manifest" in capsys.readouterr().err  # computed on first use, once
    cache.hook_stats("blocks.1.hook_mlp_out")
    assert capsys.readouterr().err == ""
    with pytest.raises(PipelineError, match="it has: blocks.0.hook_resid_post, blocks.1.hook_mlp_out"):
        cache.hook_stats("blocks.2.hook_resid_post")


def test_is_saelens_cache_rejects_other_directories(tmp_path) -> None:
    ours = tmp_path / "ours"
    write_synthetic(ours, 3, WriterConfig(format="arrow", shard_mb=0.002))
    assert not is_saelens_cache(ours)
    # Our Arrow hook tables are `datasets` directories too, but with fixed-size lists, not Array2D.
    table = next((ours / "hooks").iterdir()) / "train"
    assert (table / "state.json").is_file()
    assert not is_saelens_cache(table)

    random_dir = tmp_path / "random"
    random_dir.mkdir()
    (random_dir / "state.json").write_text("not json")
    (random_dir / "dataset_info.json").write_text(json.dumps({"features": {}}))
    assert not is_saelens_cache(random_dir)
    assert not is_saelens_cache(tmp_path / "missing")
    with pytest.raises(PipelineError, match="not a SAELens activation cache"):
        SAELensCache(ours)
