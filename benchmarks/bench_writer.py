"""Cache-writer throughput against its limit, the model's forward pass alone, in one run.

    python benchmarks/bench_writer.py [--model tiny|gpt2-small-random] [--device cpu|cuda]
                                      [--tokens N] [--format zarr|arrow] [--dtype float32]

Both passes see the same token batches (the stdlib corpus, packed the same way). The writer pass is
the whole `pipeline cache` path: tokenize and pack, forward, select rows, convert, shuffle, write,
checksum, commit. Ratio = writer tokens/s / forward-only tokens/s (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import tempfile
import time
import warnings

import torch

from cache_writer.byte_tokenizer import ByteTokenizer
from cache_writer.model_adapter import adapter_from_hooked_transformer, load_model
from cache_writer.run import CacheConfig, run_cache, special_ids
from cache_writer.text_source import iter_sequences, open_documents


def gpt2_small_random(device: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN", device=device,
                                  seed=0)
    # Built on `device` itself: its 124M random weights drawn there, not on the host and copied.
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg).eval()
    return adapter_from_hooked_transformer(model, "gpt2-small-random", tokenizer=ByteTokenizer())


def raw_write_seconds(root: str, nbytes: int, file_bytes: int = 256 << 20) -> float:
    """The disk's limit: write `nbytes` of incompressible data in fsynced files, as the writer does."""
    block = os.urandom(min(file_bytes, max(nbytes, 1)))
    path = os.path.join(root, "raw")
    os.makedirs(path, exist_ok=True)
    t0 = time.perf_counter()
    left, i = nbytes, 0
    while left > 0:
        with open(os.path.join(path, f"f{i}"), "wb") as f:
            f.write(block[: min(left, len(block))])
            f.flush()
            os.fsync(f.fileno())
        left -= len(block)
        i += 1
    seconds = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    return seconds


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_writer(model: str = "tiny", device: str = "cpu", tokens: int = 1_000_000, batch_size: int = 32,
                   context_size: int = 128, hook: str | None = None, fmt: str = "zarr", dtype: str = "float32",
                   model_dtype: str = "float32", out: str | None = None) -> dict:
    """The writer pass and the forward pass alone over the same token batches, and the disk alone
    writing the same bytes: seconds, tokens/s and the ratios (see the module docstring)."""
    if model == "gpt2-small-random":
        adapter = gpt2_small_random(device)
        if model_dtype != "float32":
            adapter.model.to(getattr(torch, model_dtype))
        hook = hook or "blocks.6.hook_resid_post"
    else:
        adapter = load_model(model, device=device, dtype=model_dtype)
        hook = hook or f"blocks.{(adapter.model.cfg.n_layers - 1) // 2}.hook_resid_post"

    # The same batches for both passes: pack the corpus once here.
    tok = adapter.tokenizer
    bos, sep, _ = special_ids(tok)
    n_seq = tokens // context_size
    seqs = [s for _, s in itertools.islice(
        iter_sequences(open_documents(None), tok, context_size, 0.05, bos, sep), n_seq)]
    batches = [torch.tensor(seqs[i:i + batch_size]) for i in range(0, len(seqs), batch_size)]

    adapter.run(batches[0], [hook])  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        adapter.run(b, [hook])
    sync(device)
    forward_s = time.perf_counter() - t0
    tokens = len(seqs) * context_size

    root = out or tempfile.mkdtemp(prefix="bench_writer_")
    cache = os.path.join(root, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    cfg = CacheConfig(out=cache, model=model, hooks=[hook], tokens=tokens, batch_size=batch_size,
                      context_size=context_size, format=fmt, dtype=dtype, device=device)
    timings: dict = {}
    t0 = time.perf_counter()
    m = run_cache(cfg, command="bench_writer", progress=False, adapter=adapter, timings=timings)
    sync(device)
    writer_s = time.perf_counter() - t0
    written = sum(f["bytes"] for s in m["splits"].values() for sh in s["shards"] for f in sh["files"].values())
    shutil.rmtree(cache, ignore_errors=True)
    disk_s = raw_write_seconds(root, written)
    if not out:
        shutil.rmtree(root, ignore_errors=True)
    return {"model": adapter.name, "device": device, "hook": hook, "d": adapter.hook_dims([hook])[hook], "format": fmt,
            "dtype": dtype, "model_dtype": model_dtype, "tokens": tokens, "batch": f"{batch_size}x{context_size}",
            "forward_s": forward_s, "writer_s": writer_s, "disk_s": disk_s, "written_bytes": written,
            "stages": timings, "ratio": forward_s / writer_s, "ratio_to_limit": max(forward_s, disk_s) / writer_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--hook", default=None)
    ap.add_argument("--format", default="zarr")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model-dtype", default="float32")
    ap.add_argument("--out", default=None, help="directory for the benchmark cache (default: a temp dir)")
    args = ap.parse_args()
    r = measure_writer(args.model, args.device, args.tokens, args.batch_size, args.context_size, args.hook,
                       args.format, args.dtype, args.model_dtype, args.out)
    tokens, written = r["tokens"], r["written_bytes"]
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset")
    print(f"model={r['model']} device={args.device} hook={r['hook']} d={r['d']} "
          f"format={args.format} dtype={args.dtype} tokens={tokens:,} batch={r['batch']} "
          f"torch_threads={torch.get_num_threads()} MALLOC_MMAP_THRESHOLD_={malloc} "
          f"cpu={platform.processor() or platform.machine()}")
    print(f"forward alone : {tokens / r['forward_s']:12,.0f} tok/s  ({r['forward_s']:.2f} s)")
    print(f"writer (all)  : {tokens / r['writer_s']:12,.0f} tok/s  ({r['writer_s']:.2f} s, {written / 2**20:,.0f} MiB "
          f"written, {written / 2**20 / r['writer_s']:,.0f} MiB/s)")
    print(f"disk alone    : {tokens / r['disk_s']:12,.0f} tok/s  ({written / 2**20 / r['disk_s']:,.0f} MiB/s: the same "
          "bytes, 256 MiB files, written and fsynced)")
    print("writer stages : " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(r["stages"].items())))
    print(f"ratio writer/forward = {r['ratio']:.3f}  (goal >= 0.9); "
          f"writer/min(forward, disk) = {r['ratio_to_limit']:.3f}")


if __name__ == "__main__":
    main()
