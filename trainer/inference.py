"""A saved SAE (ours or SAELens's) as an inference SAE, for evaluation and reports.

The SAE is rebuilt as our own architecture from `cfg.json` (a stack of one run, weights through the
architecture's `load_run`), so evaluation uses exactly the `encode`/`decode` that training and the
export tests check, instead of a second implementation of each SAELens architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from trainer.export import load_saelens
from trainer.registry import get_architecture

# SAELens inference architectures -> ours. BatchTopK and Matryoshka export as `jumprelu`.
INFERENCE_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")


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
    def hook(self) -> str | None:
        """The hook it was trained on, as its metadata says (SAELens's `hook_name`)."""
        return (self.cfg.get("metadata") or {}).get("hook_name") or self.cfg.get("hook_name")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (n, d_sae) of rows x (n, d_in), in float32."""
        return self.model.encode(x.float())[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of rows x (n, d_in), in x's dtype."""
        return self.model.decode(self.model.encode(x.float()))[0].to(x.dtype)


def load_sae(path: str | Path, device: str = "cpu") -> LoadedSAE:
    """Rebuild a saved SAE as our architecture (standard, topk, jumprelu or gated)."""
    weights, cfg = load_saelens(path)
    arch = cfg.get("architecture", "standard")
    if arch not in INFERENCE_ARCHITECTURES:
        raise PipelineError(f"SAE in {path} has architecture {arch!r}; evaluation reads "
                            f"{', '.join(INFERENCE_ARCHITECTURES)}")
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens's TopK option that ranks pre-activations by decoder norm: ours never does that.
        raise PipelineError(f"SAE in {path} sets rescale_acts_by_decoder_norm; fold the decoder norms into "
                            "W_enc/W_dec first (our topk ranks raw pre-activations)")
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z", None):
        raise PipelineError(f"SAE in {path} has reshape_activations {cfg['reshape_activations']!r}; "
                            "expected 'none' or 'hook_z'")
    cls = get_architecture(arch)
    fields = {"d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"])}
    if arch == "topk":
        fields["k"] = int(cfg["k"])
    model = cls([cls.config_class(**fields)])
    model.load_run(0, weights, cfg)
    return LoadedSAE(model=model.to(device).eval(), cfg=cfg, path=Path(path))
