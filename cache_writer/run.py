"""Stage 1: run a language model once over a text dataset and write the chosen hooks to a cache."""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache_writer.eval_split import RULE as EVAL_SPLIT_RULE
from cache_writer.model_adapter import ModelAdapter, load_model, preset_hooks
from cache_writer.text_source import iter_sequences, open_documents
from pipeline import distributed
from pipeline.config import check_fraction, check_sizes
from pipeline.errors import PipelineError
from pipeline.files import size
from pipeline.lock import DirLock, refuse_inside_cache
from pipeline.manifest import MANIFEST_FILE, read_manifest
from pipeline.transfer import to_device
from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig


@dataclass
class CacheConfig:
    """Everything `pipeline cache` takes; every field is a command-line option and a TOML key."""

    out: str = "caches/default"
    """Cache directory to write."""
    model: str = "tiny"
    """'tiny' (shipped), a TransformerLens model name, a local HF checkpoint dir, or 'hf:<id>'."""
    hooks: list[str] = field(default_factory=list)
    """Hook names (TransformerLens) or module paths (HF); default: the middle layer's residual stream."""
    preset: str | None = None
    """Hooks named for every layer, added to --hook: 'mlp' (each layer's MLP input, as circuit-tracer's
    transcoders read it, and output)."""
    dataset: str | None = None
    """None/'stdlib' (embedded corpus), a local datasets dir or text files, or a HF dataset id."""
    dataset_split: str = "train"
    """Split of the source dataset to read."""
    column: str | None = None
    """Text or token column; default 'text', else 'input_ids'/'tokens'."""
    tokenizer: str | None = None
    """'bytes' or a HF tokenizer name/path; default: the model's own."""
    context_size: int = 128
    """Tokens per packed sequence."""
    tokens: int = 2_000_000
    """Token positions to run through the model, train and eval together; rounded up to whole
    sequences of context_size."""
    batch_size: int = 32
    """Sequences per forward pass (part of the layout a resume must match)."""
    eval_fraction: float = 0.05
    """Fraction of the tokens held out as the eval split (documents in pieces of one context)."""
    exclude_special_tokens: bool = True
    """Store no rows for BOS/separator/special-token positions (their activations are outliers)."""
    positions: str | None = None
    """Keep only positions START:END of each sequence (Python slice, e.g. '1:64')."""
    dtype: str = "float32"
    """Stored dtype: float32, float16, bfloat16."""
    model_dtype: str = "float32"
    """dtype the model runs in."""
    format: str = "zarr"
    """'zarr' or 'arrow'."""
    compression: str | None = None
    """Zarr only: None, 'zstd' or 'blosc'."""
    shard_mb: float = 256.0
    """Target MiB per hook shard."""
    shuffle: bool = True
    """Shuffle rows within each shard before writing."""
    seed: int = 0
    """Seed of the on-disk shuffle."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', 'cuda:1', ..."""
    model_kwargs: dict = field(default_factory=dict)
    """Loading options passed to the model (e.g. center_writing_weights=False)."""
    trust_remote_code: bool = False
    """Allow a Hugging Face model's own code to run (only if you trust it)."""
    resume: bool = False
    """Continue an interrupted cache, or extend a complete one to more --tokens."""
    overwrite: bool = False
    """Replace an existing cache in --out."""

    def __post_init__(self) -> None:
        check_sizes(self, positive=("tokens", "context_size", "batch_size", "shard_mb"))
        check_fraction(self.eval_fraction, "--eval-fraction")


def default_hook(adapter: ModelAdapter) -> str:
    if adapter.kind != "transformer_lens":
        raise PipelineError("name a hook (--hook MODULE.PATH) for a Hugging Face model, e.g. transformer.h.3")
    return f"blocks.{(adapter.model.cfg.n_layers - 1) // 2}.hook_resid_post"


def parse_positions(spec: str | None, context_size: int) -> slice:
    if not spec:
        return slice(None)
    try:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        if len(parts) != 2:
            raise ValueError
    except ValueError:
        raise PipelineError(f"--positions {spec!r} is not START:END (e.g. 1:64)") from None
    return slice(*parts)


def load_tokenizer(cfg: CacheConfig, adapter: ModelAdapter):
    if cfg.tokenizer:
        from cache_writer.pretokenize import load_named_tokenizer

        return load_named_tokenizer(cfg.tokenizer)
    if adapter.tokenizer is None:
        raise PipelineError(f"model {adapter.name!r} has no tokenizer; pass --tokenizer NAME (or 'bytes')")
    return adapter.tokenizer


def special_ids(tokenizer) -> tuple[int | None, int | None, set[int]]:
    """(BOS, separator, ids whose positions are not cached) for a tokenizer, as SAELens packs."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = bos if bos is not None else eos
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | {i for i in (bos, eos, sep) if i is not None}
    return bos, sep, special


def run_cache(cfg: CacheConfig, command: str | None = None, progress: bool = True,
              adapter: ModelAdapter | None = None, timings: dict | None = None) -> dict:
    """Write (or resume, or extend) a cache; returns its manifest.

    `adapter` replaces cfg.model (a model already in memory); `timings`, if given, receives the
    seconds spent per stage (tokenize, forward, and the writer's convert/commit/wait).

    Under torchrun every rank runs this: forward batch b (of cfg.batch_size sequences) goes to rank
    b % world size, each rank commits its own shards and progress, and rank 0 assembles the one
    manifest at the end (pipeline.assemble).
    """
    from pipeline.hub import hub_repo_of

    repo = hub_repo_of(cfg.out)
    # `--out hf://datasets/ORG/NAME`: shards are written to a local staging folder and uploaded as
    # they are committed (a resumed run resumes the upload: what the Hub has is skipped).
    out = Path(os.environ.get("SAE_PIPELINE_HUB_STAGING", "caches/hub")) / repo.replace("/", "--") if repo \
        else Path(cfg.out)
    refuse_inside_cache(out, itself=False)  # the cache itself: --resume extends it
    n_target = math.ceil(cfg.tokens / cfg.context_size)
    if cfg.eval_fraction > 0 and n_target < 2:
        raise PipelineError(
            f"--tokens {cfg.tokens:,} is {n_target} sequence of {cfg.context_size} tokens: too few for a train and "
            f"an eval split; cache at least {2 * cfg.context_size} tokens, or pass --eval-fraction 0"
        )
    world, rank = distributed.init(cfg.device), distributed.rank()
    # Rank 0 holds the folder for every rank of a torchrun: they start and stop together.
    with DirLock(out, "pipeline cache") if rank == 0 else nullcontext():
        done_already = distributed.agree(_complete, out, n_target) if cfg.resume else None
        if done_already is not None:
            return done_already
        if world > 1:
            from pipeline.assemble import assemble, prepare

            distributed.agree(prepare, out, world, cfg.resume, cfg.overwrite)
        uploader = None  # created before the model loads: a missing token fails fast
        if repo and world == 1:
            from pipeline.hub import HubUploader

            print(f"writing to {out} and uploading each committed shard to the Hub dataset {repo}")
            uploader = HubUploader(out, repo)
        device = distributed.device_for(cfg.device)
        if adapter is None:
            adapter = load_model(cfg.model, device=device, dtype=cfg.model_dtype, model_kwargs=cfg.model_kwargs,
                                 trust_remote_code=cfg.trust_remote_code)
        hooks = list(dict.fromkeys(list(cfg.hooks) + (preset_hooks(adapter, cfg.preset) if cfg.preset else [])))
        hooks = hooks or [default_hook(adapter)]
        adapter.check_hooks(hooks)
        if adapter.n_ctx is not None and cfg.context_size > adapter.n_ctx:
            raise PipelineError(
                f"--context-size {cfg.context_size} is above model {adapter.name}'s context of {adapter.n_ctx}; "
                f"use --context-size {adapter.n_ctx} or less"
            )
        tokenizer = load_tokenizer(cfg, adapter)
        bos, sep, special = special_ids(tokenizer)
        source = open_documents(cfg.dataset, cfg.column, cfg.dataset_split)
        dims = adapter.hook_dims(hooks)
        pos_slice = parse_positions(cfg.positions, cfg.context_size)
        source_config = {
            "model": {k: adapter.info.get(k) for k in ("name", "config_hash", "dtype", "kwargs", "weights_xxh3_64")},
            "dataset": {k: source.provenance.get(k) for k in ("name", "split", "revision")},
            "column": source.column, "tokenizer": getattr(tokenizer, "name_or_path", getattr(tokenizer, "name", None)),
            "context_size": cfg.context_size, "batch_size": cfg.batch_size, "eval_fraction": cfg.eval_fraction,
            "exclude_special_tokens": cfg.exclude_special_tokens, "positions": cfg.positions,
            "packing": {"bos_token_id": bos, "separator_token_id": sep, "rule": "SAELens concat_and_batch_sequences"},
            "eval_split": EVAL_SPLIT_RULE,
        }
        provenance = {
            "model": adapter.info, "tokenizer": source_config["tokenizer"], "dataset": source.provenance,
            "context_size": cfg.context_size, "packing": source_config["packing"],
            "command": command or " ".join(sys.argv), "cache_config": {k: v for k, v in asdict(cfg).items()},
        }
        writer = CacheWriter(
            out, dims,
            WriterConfig(format=cfg.format, dtype=cfg.dtype, compression=cfg.compression, shard_mb=cfg.shard_mb,
                         shuffle=cfg.shuffle, seed=cfg.seed),
            source_config=source_config, provenance=provenance, has_tokens=True,
            resume=cfg.resume, overwrite=cfg.overwrite, expected_rows=n_target * cfg.context_size // world,
            part=(rank, world) if world > 1 else None, on_commit=uploader.on_commit if uploader else None,
        )
        if writer.disk_plan is not None and rank == 0:
            need, free = writer.disk_plan
            # One line of at most 100 columns, as the progress lines (a log file's).
            print(f"the cache needs about {size(need)} of disk ({len(hooks)} hook{'s' * (len(hooks) > 1)}, "
                  f"{sum(dims.values()):,} values a row, {cfg.dtype}); {size(free)} free", flush=True)
        sequences = iter_sequences(source, tokenizer, cfg.context_size, cfg.eval_fraction, bos, sep)
        done = writer.resume_units
        # Where this rank starts in the source: one process right after what it committed; rank r of W
        # at its next own batch (its k-th batch is the source's batch r + k * W).
        at = done if world == 1 else (rank + math.ceil(done / cfg.batch_size) * world) * cfg.batch_size
        sequences = itertools.islice(sequences, at, None)
        if world > 1:
            distributed.barrier()  # every rank has dropped what it will redo: list what is left
            if rank == 0:
                assemble(out, world, complete=False, batch_size=cfg.batch_size)
        special_ids_np = np.array(sorted(special), dtype=np.int64) if cfg.exclude_special_tokens else None
        if progress and rank == 0 and n_target * cfg.context_size != cfg.tokens:  # the bar counts whole sequences
            print(f"caching {n_target:,} sequences of {cfg.context_size} tokens: {_rounded(cfg, n_target)}")
        bar = _progress_bar(n_target * cfg.context_size // world, done * cfg.context_size, progress and rank == 0)
        clock = {"tokenize": 0.0, "forward": 0.0}
        try:
            while at < n_target:
                t0 = time.perf_counter()
                batch = list(itertools.islice(sequences, min(cfg.batch_size, n_target - at)))
                if not batch:
                    if rank == 0:
                        print(f"the dataset ended after {at * cfg.context_size:,} tokens (asked for {cfg.tokens:,})")
                    break
                mine = world == 1 or (at // cfg.batch_size) % world == rank
                at += len(batch)
                if not mine:  # another rank's batch: tokenized here too, to know where the next one starts
                    continue
                splits = [s for s, _ in batch]
                tokens = np.array([t for _, t in batch], dtype=np.int64)
                t1 = time.perf_counter()
                acts = adapter.run(torch.from_numpy(tokens), hooks)
                blocks = _blocks(tokens, splits, acts, pos_slice, special_ids_np)
                t2 = time.perf_counter()
                writer.put(blocks)
                clock["tokenize"] += t1 - t0
                clock["forward"] += t2 - t1
                done += len(batch)
                bar.update(len(batch) * cfg.context_size)
        except KeyboardInterrupt:
            writer.abort()
            bar.close()
            m = read_manifest(writer.manifest_dir)
            raise PipelineError(
                f"interrupted: {sum(len(s['shards']) for s in m['splits'].values())} committed shards in {out} are "
                "intact; rerun with --resume to continue"
            ) from None
        except BaseException:
            writer.abort()
            bar.close()
            raise
        bar.close()
        manifest = writer.close(complete=True)
        if uploader is not None:
            uploader.close()
        if world > 1:
            distributed.barrier()  # every rank's part is complete
            manifest = distributed.agree(assemble, out, world, True, cfg.batch_size)
            if repo and rank == 0:
                from pipeline.hub import push_cache

                push_cache(out, repo)
        if cfg.eval_fraction > 0 and manifest["splits"]["eval"]["rows"] == 0 and rank == 0:
            print("the cache has no eval rows: the dataset ended before it filled a sequence for each split; "
                  "use a larger dataset, or --eval-fraction 0")
        if timings is not None:
            timings.update(clock, **writer.seconds)
        return manifest


def _rounded(cfg: CacheConfig, sequences: int) -> str:
    """`20,096 tokens (--tokens 20,000 rounded up to whole sequences)`: what `sequences` whole
    contexts hold against what --tokens asked for."""
    tokens = sequences * cfg.context_size
    if tokens == cfg.tokens:
        return f"{tokens:,} tokens"
    why = "rounded up to whole sequences" if tokens > cfg.tokens else "the dataset ended before"
    return f"{tokens:,} tokens (--tokens {cfg.tokens:,} {why})"


def written_line(cfg: CacheConfig, manifest: dict) -> str:
    """`pipeline cache`'s last line: the sequences and tokens run (against --tokens), the rows stored
    per split, the hooks."""
    splits = manifest["splits"]
    sequences = sum(s["sequences"] for s in splits.values())
    rows = {s: v["rows"] for s, v in splits.items()}
    left_out = " (special-token positions store none)" if cfg.exclude_special_tokens else ""
    return (f"wrote {cfg.out}: {sequences:,} sequences of {cfg.context_size} tokens = {_rounded(cfg, sequences)}, "
            f"train and eval together: {rows['train']:,} train rows + {rows['eval']:,} eval rows{left_out}; "
            f"hooks {', '.join(manifest['hooks'])}; complete={manifest['complete']}")


def _complete(out: Path, n_target: int) -> dict | None:
    """The manifest of a complete cache that already holds `n_target` sequences (nothing to do)."""
    if not (out / MANIFEST_FILE).exists():
        return None
    m = read_manifest(out)
    if m["complete"] and m["progress"]["units"] >= n_target:
        print(f"{out} is complete with {m['progress']['units']} sequences; nothing to do")
        return m
    return None


def _blocks(tokens: np.ndarray, splits: list[str], acts: dict[str, torch.Tensor], pos_slice: slice,
            special: np.ndarray | None) -> list[ActivationBlock]:
    """Split one forward batch into per-split blocks of kept positions, in (sequence, position) order.

    The row selection is computed on the CPU and applied with `index_select` on the model's device,
    so the producer never waits for the GPU (a boolean mask on the GPU would synchronise).
    """
    b, t = tokens.shape
    keep = np.zeros((b, t), dtype=bool)
    keep[:, pos_slice] = True
    if special is not None:
        keep &= ~np.isin(tokens, special)
    device = next(iter(acts.values())).device
    flat_acts = {h: a.reshape(b * t, *a.shape[2:]) for h, a in acts.items()}
    split_of = np.asarray(splits)
    blocks = []
    for split in ("train", "eval"):
        idx = np.flatnonzero(split_of == split)
        if len(idx) == 0:
            continue
        seq, pos = np.nonzero(keep[idx])
        rows = to_device(torch.from_numpy(idx[seq] * t + pos), device)
        blocks.append(ActivationBlock(
            acts={h: a.index_select(0, rows) for h, a in flat_acts.items()}, split=split,
            token_ids=tokens[idx[seq], pos], sequence=seq, position=pos, sequences=tokens[idx], units=len(idx),
        ))
    return blocks


def _progress_bar(total: int, initial: int, enabled: bool):
    """tqdm's bar on a terminal; in a log file (where a bar is one long line of carriage returns), a
    plain line at every tenth of the way."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, disable=not enabled,
                desc="caching", smoothing=0.1, dynamic_ncols=True)


class LineProgress:
    """Progress as whole lines: `caching: 40% (800,000 of 2,000,000 tokens), 180,000 tok/s`."""

    def __init__(self, total: int, initial: int = 0, steps: int = 10):
        self.total, self.done, self.start_done, self.steps = max(total, 1), initial, initial, steps
        self.t0 = time.perf_counter()
        self.marks = initial * steps // self.total  # tenths already behind us

    def update(self, n: int) -> None:
        self.done += n
        if self.done * self.steps >= (self.marks + 1) * self.total:
            self.marks = self.done * self.steps // self.total
            rate = (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
            print(f"caching: {self.done / self.total:.0%} ({self.done:,} of {self.total:,} tokens), {rate:,.0f} tok/s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass
