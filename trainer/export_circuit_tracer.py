"""Per-layer transcoder sets in circuit-tracer's format (`circuit_tracer.transcoder`, 0.5.0), from our
SAELens-format exports of each layer.

    SET/config.yaml            model_kind: transcoder_set, model_name, feature_input_hook, feature_output_hook
    SET/layer_<l>.safetensors  one per layer, from 0: W_enc (d_sae, d_model), W_dec (d_sae, d_model),
                               b_enc (d_sae), b_dec (d_model), + activation_function.threshold (d_sae)
                               for a JumpReLU, + W_skip (d_model, d_model) for a skip-transcoder

as `load_relu_transcoder(path, layer)` reads a file (a ReLU without a threshold, a JumpReLU with one;
the skip path applied as input @ W_skip.T) and `load_transcoder_set(paths, ...)` a set, and as
`circuit_tracer.utils.hf_utils.load_transcoders` reads a Hub repo of these files (the config names
no paths: it globs layer_*.safetensors). Its transcoders read and write the same width (d_model)
and have no input bias: ours fold the input centring into b_enc (and b_dec) on export. It has no
TopK activation, so a TopK set stays in SAELens's format only; BatchTopK exports as a JumpReLU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from pipeline.errors import PipelineError
from pipeline.files import save_safetensors
from trainer.export import load_saelens

# Our export kinds -> whether circuit-tracer's activation is a JumpReLU (with a threshold) or a ReLU.
JUMPRELU_KINDS = ("jumprelu_transcoder", "jumprelu_skip_transcoder")
RELU_KINDS = ("transcoder", "skip_transcoder")
CONFIG_FILE = "config.yaml"


def block_relative(hook: str) -> str:
    """A TransformerLens hook name as circuit-tracer's set names it, relative to its block
    (`blocks.3.ln2.hook_normalized` -> `ln2.hook_normalized`); other names as they are."""
    return re.sub(r"^blocks\.\d+\.", "", hook)


def circuit_tracer_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """One layer's tensors in circuit-tracer's names and shapes, from our SAELens-format export in `path`."""
    weights, cfg = load_saelens(path)
    kind = cfg.get("architecture")
    if kind not in JUMPRELU_KINDS + RELU_KINDS:
        why = ("circuit-tracer has no TopK transcoder (its loader reads ReLU and JumpReLU ones); train the set "
               "with batchtopk or jumprelu" if "topk" in str(kind) else
               f"circuit-tracer's set loader reads transcoders ({', '.join(RELU_KINDS + JUMPRELU_KINDS)})")
        raise PipelineError(f"{path} is a {kind!r}: {why}")
    d_in, d_out = int(cfg["d_in"]), int(cfg.get("d_out") or cfg["d_in"])
    if d_in != d_out:
        raise PipelineError(f"{path} reads width d_in = {d_in} and writes d_out = {d_out}: circuit-tracer's "
                            "SingleLayerTranscoder reads and writes the residual width d_model, so they must be equal")
    out = {"W_enc": weights["W_enc"].T, "W_dec": weights["W_dec"], "b_enc": weights["b_enc"], "b_dec": weights["b_dec"]}
    if kind in JUMPRELU_KINDS:
        out["activation_function.threshold"] = weights["threshold"]
    if "W_skip" in weights:
        out["W_skip"] = weights["W_skip"]
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def write_transcoder_set(out: str | Path, layers: Mapping[int, str | Path]) -> Path:
    """Write circuit-tracer's files for a per-layer set into `out`, from our exports `layers` (layer ->
    export directory; every layer from 0, as circuit-tracer's TranscoderSet needs). The hooks come from
    the exports' metadata (hook_name, hook_name_out), relative to their block."""
    out = Path(out)
    order = sorted(layers)
    if order != list(range(len(order))):
        raise PipelineError(f"circuit-tracer's TranscoderSet needs a transcoder for every layer from 0; this set "
                            f"has layers {', '.join(map(str, order))}")
    metas = [json.loads((Path(layers[layer]) / "cfg.json").read_text()).get("metadata") or {} for layer in order]
    hooks = {(block_relative(m.get("hook_name", "")), block_relative(m.get("hook_name_out", ""))) for m in metas}
    if len(hooks) != 1 or not all(next(iter(hooks))):
        raise PipelineError(f"the layers of a set must read and write the same hooks of their blocks; got "
                            f"{sorted(hooks)}")
    tensors = {layer: circuit_tracer_weights(layers[layer]) for layer in order}
    widths = {(t["W_enc"].shape[1], t["W_enc"].shape[0]) for t in tensors.values()}
    if len(widths) != 1:
        raise PipelineError(f"circuit-tracer's TranscoderSet needs one d_model and one d_sae for every layer; "
                            f"got (d_model, d_sae) {sorted(widths)}")
    if len({"W_skip" in t for t in tensors.values()}) != 1:
        raise PipelineError("some layers of this set have a skip path and some do not; circuit-tracer's set has "
                            "one kind")
    out.mkdir(parents=True, exist_ok=True)
    for layer in order:
        save_safetensors(tensors[layer], str(out / f"layer_{layer}.safetensors"))
    feature_input_hook, feature_output_hook = next(iter(hooks))
    # YAML that circuit-tracer's yaml.safe_load reads: JSON strings are YAML scalars (no YAML writer needed).
    fields = {"model_name": metas[0].get("model_name"), "model_kind": "transcoder_set",
              "feature_input_hook": feature_input_hook, "feature_output_hook": feature_output_hook}
    (out / CONFIG_FILE).write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return out
