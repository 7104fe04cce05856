"""Train the shipped tiny byte-level model on the stdlib corpus and save it as safetensors.

Usage: python -m cache_writer.train_tiny_model [--steps N] [--device cpu|cuda] [--out DIR]

The default run is sized to take roughly 4 minutes on a 2-core CPU. For speed on
glibc, run with MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296.
"""

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer

from cache_writer.byte_tokenizer import ByteTokenizer
from cache_writer.packing import pack_sequences
from cache_writer.stdlib_corpus import STDLIB_DATASET_ID, load_stdlib_dataset, stdlib_revision
from cache_writer.tiny_model import (
    CONFIG_FILENAME,
    TINY_MODEL_DIR,
    WEIGHTS_FILENAME,
    build_model,
    tiny_model_config,
    tiny_model_config_dict,
)
from pipeline.files import save_safetensors

CONTEXT_SIZE = 128
EVAL_FRACTION = 0.05
DEFAULT_STEPS = 500
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 3e-3
DEFAULT_SEED = 0
DEFAULT_EVAL_SEQS = 256


def packed_rows(split: str, seed: int | None) -> np.ndarray:
    """Tokenize a corpus split and pack it into a ``(n_rows, CONTEXT_SIZE)`` int64 array."""
    tok = ByteTokenizer()
    texts = list(load_stdlib_dataset(split, eval_fraction=EVAL_FRACTION)["text"])
    if seed is not None:
        # Files are path-sorted, so neighbouring rows share a package; shuffle to mix topics.
        random.Random(seed).shuffle(texts)
    docs = (tok.encode(t) for t in texts)
    rows = pack_sequences(docs, CONTEXT_SIZE, tok.bos_token_id, tok.bos_token_id)
    # uint16 while collecting keeps the ~30M-token train set small in memory.
    arr = np.array(list(rows), dtype=np.uint16)
    return arr.astype(np.int64)


def lr_at(step: int, steps: int, peak_lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model: HookedTransformer, rows: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token loss (nats/byte) over every position of each row."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(rows[start : start + batch_size]).to(model.cfg.device)
        loss = model(batch, return_type="loss")
        total += loss.item() * batch.shape[0]
        count += batch.shape[0]
    return total / count


def save_model_atomically(model: HookedTransformer, meta: dict, out: Path) -> None:
    """Write weights then config via temp files + rename, so readers never see half a file."""
    out.mkdir(parents=True, exist_ok=True)
    # Parameters only: buffers (causal masks) are rebuilt by the constructor.
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.named_parameters()}
    tmp_weights = out / f".{WEIGHTS_FILENAME}.tmp"
    tmp_config = out / f".{CONFIG_FILENAME}.tmp"
    save_safetensors(state, tmp_weights, metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(meta, indent=2) + "\n")
    # Config last: it is the file that declares the weights valid.
    os.replace(tmp_weights, out / WEIGHTS_FILENAME)
    os.replace(tmp_config, out / CONFIG_FILENAME)


def train(
    steps: int = DEFAULT_STEPS,
    device: str = "cpu",
    out: Path = TINY_MODEL_DIR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = DEFAULT_SEED,
    eval_seqs: int = DEFAULT_EVAL_SEQS,
    threads: int = 2,
) -> dict:
    """Train, evaluate on the held-out files, save to ``out``; return the saved metadata."""
    if device == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np_rng = np.random.default_rng(seed)

    print("packing stdlib corpus ...", flush=True)
    train_rows = packed_rows("train", seed=seed)
    eval_all = packed_rows("eval", seed=None)
    # Evenly spaced rows cover every held-out file rather than just the first few.
    eval_idx = np.linspace(0, len(eval_all) - 1, num=min(eval_seqs, len(eval_all))).round().astype(int)
    eval_rows = eval_all[np.unique(eval_idx)]
    print(f"train rows: {len(train_rows)}  eval rows: {len(eval_rows)} (of {len(eval_all)})", flush=True)

    model = build_model(tiny_model_config(), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, min(100, steps // 10))

    # One shuffled pass; wrap around only if asked for more rows than the corpus holds.
    n_epochs = 1 + steps * batch_size // len(train_rows)
    order = np.concatenate([np_rng.permutation(len(train_rows)) for _ in range(n_epochs)])
    model.train()
    tokens_seen = 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        idx = order[step * batch_size : (step + 1) * batch_size]
        batch = torch.from_numpy(train_rows[idx]).to(device)
        loss = model(batch, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += batch.numel()
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / elapsed:,.0f}")
    bar.close()
    train_time = time.perf_counter() - start

    eval_loss = heldout_loss(model, eval_rows)
    print(
        f"held-out loss: {eval_loss:.4f} nats/byte (uniform {math.log(256):.4f}); train {train_time:.0f}s",
        flush=True,
    )

    meta = {
        "hooked_transformer_config": tiny_model_config_dict(),
        "tokenizer": ByteTokenizer.name,
        "bos_token_id": ByteTokenizer.bos_token_id,
        "context_size": CONTEXT_SIZE,
        "dataset": {"id": STDLIB_DATASET_ID, "eval_fraction": EVAL_FRACTION, "revision": stdlib_revision()},
        "training": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "tokens_seen": tokens_seen,
            "train_time_s": round(train_time, 1),
            "device": device,
            "torch_version": torch.__version__,
        },
        "eval": {
            "heldout_loss_nats_per_byte": eval_loss,
            "uniform_loss": math.log(256),
            # Each row of n tokens gives n-1 next-token predictions.
            "eval_tokens": int(eval_rows.shape[0] * (CONTEXT_SIZE - 1)),
        },
    }
    save_model_atomically(model, meta, Path(out))
    print(f"saved to {out}", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=TINY_MODEL_DIR)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--eval-seqs", type=int, default=DEFAULT_EVAL_SEQS)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    train(
        steps=args.steps,
        device=args.device,
        out=args.out,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        eval_seqs=args.eval_seqs,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
