"""A saved SAE (ours or SAELens's) as an inference SAE, for evaluation and reports.

The SAE is rebuilt as our own architecture from `cfg.json` (a stack of one run, weights through the
architecture's `load_run`), so evaluation uses exactly the `encode`/`decode` that training and the
export tests check, instead of a second implementation of each SAELens architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.reader import Cache
from trainer.export import load_saelens
from trainer.registry import get_architecture

# SAELens inference architectures -> ours. BatchTopK and Matryoshka export as `jumprelu`.
INFERENCE_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
# Transcoders (read one hook, reconstruct another) -> the architecture that trains them; the skip kinds
# (a linear path from input to output beside the latents) are the same with skip = True.
TRANSCODERS = {"transcoder": "standard", "jumprelu_transcoder": "jumprelu", "topk_transcoder": "topk",
               "skip_transcoder": "standard", "jumprelu_skip_transcoder": "jumprelu", "topk_skip_transcoder": "topk"}


@dataclass
class LoadedSAE:
    """An SAE ready for inference on raw activations of its hook."""

    model: torch.nn.Module
    """Our architecture, a stack of one run, in eval mode."""
    cfg: dict
    """The SAE's cfg.json (apply_b_dec_to_input folded in, see trainer.export.load_saelens)."""
    path: Path
    """The directory it was loaded from."""

    @property
    def architecture(self) -> str:
        return self.cfg["architecture"]

    @property
    def d_in(self) -> int:
        return int(self.cfg["d_in"])

    @property
    def d_sae(self) -> int:
        return int(self.cfg["d_sae"])

    @property
    def d_out(self) -> int:
        """The reconstruction's width: d_in for an SAE, the output hook's for a transcoder."""
        return int(self.cfg.get("d_out") or self.cfg["d_in"])

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def hook(self) -> str | None:
        """The hook it reads, as its metadata says (SAELens's `hook_name`)."""
        return self._meta("hook_name")

    @property
    def hook_out(self) -> str | None:
        """A transcoder's output hook, the one it reconstructs (`hook_name_out`); None for an SAE."""
        return self._meta("hook_name_out") if self.is_transcoder else None

    def _meta(self, key: str) -> str | None:
        return (self.cfg.get("metadata") or {}).get(key) or self.cfg.get(key)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (n, d_sae) of rows x (n, d_in), in float32."""
        return self.model.encode(x.float())[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction (n, d_out) of rows x (n, d_in), in x's dtype (a transcoder: its output hook's)."""
        return self.model.decode(self.model.encode(x.float()), x.float())[0].to(x.dtype)


def load_sae(path: str | Path, device: str = "cpu") -> LoadedSAE:
    """Rebuild a saved SAE or transcoder as our architecture (every kind `pipeline train` exports,
    and SAELens's standard, topk, jumprelu, gated, transcoder and jumprelu_transcoder)."""
    weights, cfg = load_saelens(path)
    arch = cfg.get("architecture", "standard")
    ours = TRANSCODERS.get(arch, arch)
    if ours not in INFERENCE_ARCHITECTURES:
        raise PipelineError(f"SAE in {path} has architecture {arch!r}; evaluation reads "
                            f"{', '.join(INFERENCE_ARCHITECTURES + tuple(TRANSCODERS))}")
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens's TopK option that ranks pre-activations by decoder norm: ours never does that.
        raise PipelineError(f"SAE in {path} sets rescale_acts_by_decoder_norm; fold the decoder norms into "
                            "W_enc/W_dec first (our topk ranks raw pre-activations)")
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z", None):
        raise PipelineError(f"SAE in {path} has reshape_activations {cfg['reshape_activations']!r}; "
                            "expected 'none' or 'hook_z'")
    cls = get_architecture(ours)
    fields = {"d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"])}
    if ours == "topk":
        fields["k"] = int(cfg["k"])
    if arch in TRANSCODERS:
        fields["d_out"] = int(cfg["d_out"])
        fields["skip"] = "skip_transcoder" in arch
    model = cls([cls.config_class(**fields)])
    model.load_run(0, weights, cfg)
    return LoadedSAE(model=model.to(device).eval(), cfg=cfg, path=Path(path))


def split_chunks(cache: Cache, hooks: list[str], split: str, chunk_rows: int, max_rows: int | None = None
                 ) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor | None]]:
    """(shard, one (n, d) tensor per hook in the stored dtype, token rows (n, 3) int64 or None when the
    cache stores no tokens) for consecutive chunks of a split, in disk order; `max_rows` rows at most.
    Rows i of every hook and of the token table are the same token."""
    seen = 0
    has_tokens = bool(cache.manifest.get("has_tokens"))
    for shard in range(len(cache.shards(split))):
        acts = [cache.activations_tensor(h, split, shard) for h in hooks]
        tok = torch.from_numpy(np.ascontiguousarray(cache.tokens(split, shard))).long() if has_tokens else None
        for start in range(0, len(acts[0]), chunk_rows):
            stop = min(start + chunk_rows, len(acts[0]))
            if max_rows is not None:
                stop = min(stop, start + max_rows - seen)
            if stop <= start:
                return
            seen += stop - start
            yield shard, [a[start:stop] for a in acts], tok[start:stop] if tok is not None else None
