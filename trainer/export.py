"""SAEs in SAELens's on-disk format: export a run of a stack, load one (ours or SAELens's) back.

`DIR/cfg.json` + `DIR/sae_weights.safetensors` (+ `DIR/sparsity.safetensors`), as SAELens's
`SAE.save_inference_model` writes and `SAE.load_from_disk` reads: `W_enc (d_in, d_sae)`,
`W_dec (d_sae, d_in)`, `b_enc (d_sae)`, `b_dec (d_in)` (+ `threshold` for JumpReLU, `W_skip (d_out, d_in)`
for a skip-transcoder), float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.errors import PipelineError
from pipeline.files import save_safetensors


def export_saelens(model, run: int, out: str | Path, metadata: dict, sparsity: torch.Tensor | None = None,
                   input_scale: float = 1.0, output_scale: float | None = None) -> Path:
    """Write run `run` of a stack to `out` in SAELens's format.

    `input_scale` is the factor the loader multiplied activations by during training
    (`ActivationLoader.scale`); it is folded into the weights, so the export reads raw activations:
    with x' = c x, pre-activations (c x - b_dec) W_enc = (x - b_dec / c)(c W_enc) are unchanged and
    the reconstruction divides by c. A transcoder's target hook has its own `output_scale`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights, arch_cfg = model.export_run(run)
    weights = fold_input_scale({k: v.detach().to("cpu", torch.float32).clone() for k, v in weights.items()},
                               input_scale, output_scale)
    cfg = {"d_in": model.d_in, "d_sae": model.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           **arch_cfg, "metadata": metadata}
    save_safetensors({k: v.contiguous() for k, v in weights.items()}, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
    if sparsity is not None:
        save_safetensors({"sparsity": sparsity.detach().to("cpu", torch.float32).contiguous()},
                  str(out / "sparsity.safetensors"))
    return out


def fold_input_scale(weights: dict[str, torch.Tensor], c: float, c_out: float | None = None) -> dict[str, torch.Tensor]:
    """Weights of an SAE for inputs x from those of one trained on c * x (in place; 1 / c undoes it).
    A transcoder trained to map c * x to c_out * y: W_enc * c, and its output divided by c_out (a
    skip-transcoder's W_skip, from c * x to c_out * y, both: times c / c_out)."""
    c_out = c if c_out is None else c_out
    if c != 1.0:
        weights["W_enc"] *= c
    if c_out != 1.0:
        weights["W_dec"] /= c_out
        weights["b_dec"] /= c_out
    if "W_skip" in weights and c != c_out:
        weights["W_skip"] *= c / c_out
    return weights


def load_saelens(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and cfg of an SAE saved in SAELens's format (by us or by SAELens), in the form our
    architectures use: b_dec always subtracted from the input (an SAE saved with
    `apply_b_dec_to_input: false` gets the equivalent b_enc + b_dec @ W_enc)."""
    path = Path(path)
    cfg_file, weights_file = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise PipelineError(f"{path} is not a saved SAE: it needs cfg.json and sae_weights.safetensors "
                            "(SAELens's save_inference_model layout, or a `pipeline train` export)")
    cfg = json.loads(cfg_file.read_text())
    weights = load_file(str(weights_file))
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise PipelineError(f"{path} expects activations normalised by {cfg['normalize_activations']!r}; "
                            "fold the scaling into its weights first (SAELens: fold_activation_norm_scaling_factor)")
    if not cfg.get("apply_b_dec_to_input", True) and "transcoder" not in cfg.get("architecture", ""):
        # Ours compute (x - b_dec) @ W_enc + b: the same pre-activations need b + b_dec @ W_enc.
        shift = weights["b_dec"] @ weights["W_enc"]
        if "b_gate" in weights:  # gated: the gate and the magnitude path (W_enc scaled by exp(r_mag))
            weights["b_gate"] = weights["b_gate"] + shift
            weights["b_mag"] = weights["b_mag"] + shift * weights["r_mag"].exp()
        else:
            weights["b_enc"] = weights["b_enc"] + shift
        cfg["apply_b_dec_to_input"] = True
    return weights, cfg


def init_from(model, path: str | Path, run: int | None = None, input_scale: float = 1.0,
              output_scale: float | None = None) -> dict:
    """Load a saved SAE into run `run` of `model` (every run when None), to continue training it on
    activations multiplied by `input_scale` (the loader's normalisation).

    The saved d_in and d_sae must match the model's; returns the saved cfg."""
    weights, cfg = load_saelens(path)
    fold_input_scale(weights, 1.0 / input_scale, 1.0 / (output_scale if output_scale is not None else input_scale))
    cfg.setdefault("d_out", cfg.get("d_in"))
    for name in ("d_in", "d_sae", "d_out"):
        saved, ours = cfg.get(name), getattr(model, name, cfg.get(name))
        if saved != ours:
            raise PipelineError(f"SAE in {path} has {name} = {saved}, but this run has {name} = {ours}"
                                + {"d_in": " (the cache's hook width)", "d_out": " (the width of --hook-out)"}.get(
                                    name, f"; pass --d-sae {saved}"))
    for r in range(model.n_runs) if run is None else [run]:
        model.load_run(r, weights, cfg)
    return cfg
