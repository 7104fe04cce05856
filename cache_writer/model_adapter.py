"""The model side of stage 1: load a model, name its hooks, run a forward pass that captures them.

Two kinds of model sit behind one small interface, so a TransformerLens `TransformerBridge`
adapter can be added later without touching the rest:
- TransformerLens `HookedTransformer`s (by name, or the shipped `tiny` model), hooks by hook name
  (`blocks.3.hook_resid_post`; `blocks.2.attn.hook_z` flattened over heads, `blocks.2.attn.hook_z:3`
  for head 3);
- plain Hugging Face causal LMs from a local checkpoint directory (or a hub id with `hf:`), hooks by
  module path (`transformer.h.3`, the module's output or its first element when a tuple).
In both, the forward pass stops after the last hooked layer.
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.errors import PipelineError
from pipeline.transfer import to_device

HEAD_SUFFIX = re.compile(r"^(?P<base>.+\.hook_(?:z|q|k|v|result)):(?P<head>\d+)$")


def unknown_hook_error(hook: str, valid: list[str]) -> PipelineError:
    near = difflib.get_close_matches(hook, valid, n=6, cutoff=0.5) or valid[:6]
    return PipelineError(f"unknown hook {hook!r}; nearest valid hooks: {', '.join(near)}")


class _StopForward(Exception):
    """Raised from the last forward hook: nothing after it is needed."""


@dataclass
class ModelAdapter:
    """A loaded model plus how to capture named activations from it."""

    name: str
    kind: str
    """'transformer_lens' or 'huggingface'."""
    model: Any
    tokenizer: Any
    n_ctx: int | None
    device: str
    info: dict = field(default_factory=dict)
    """Provenance: model id, config hash, dtype, loading options."""
    _capture: Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]] | None = None
    valid_hooks: list[str] = field(default_factory=list)

    def check_hooks(self, hooks: list[str]) -> None:
        for hook in hooks:
            base = hook
            if self.kind == "transformer_lens" and (m := HEAD_SUFFIX.match(hook)):
                base = m["base"]
            if base not in self.valid_hooks:
                raise unknown_hook_error(hook, self.valid_hooks)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """hook -> (batch, seq, d) activations for a (batch, seq) token tensor."""
        return self._capture(to_device(tokens, self.device), hooks)

    def hook_dims(self, hooks: list[str]) -> dict[str, int]:
        """Width of each hook's rows, from a forward pass over two tokens."""
        probe = torch.zeros(1, 2, dtype=torch.long)
        return {h: int(a.shape[-1]) for h, a in self.run(probe, hooks).items()}


# ------------------------------------------------------------------------------ TransformerLens


def _tl_stop_layer(hooks: list[str], n_layers: int) -> int | None:
    layers = []
    for hook in hooks:
        if m := re.match(r"^blocks\.(\d+)\.", hook):
            layers.append(int(m[1]) + 1)
        elif hook in ("hook_embed", "hook_pos_embed", "hook_tokens"):
            layers.append(0)
        else:
            return None  # ln_final, unembed: the whole model runs
    stop = max(layers)
    return None if stop >= n_layers else stop


def adapter_from_hooked_transformer(model, name: str, tokenizer: Any = None, info: dict | None = None) -> ModelAdapter:
    """Wrap a HookedTransformer already in memory (your own, or random weights for a benchmark)."""
    device = str(next(model.parameters()).device)
    info = info or {"name": name, "source": "in-memory", "kind": "transformer_lens",
                    "config_hash": _config_hash(model.cfg.to_dict())}
    adapter = _tl_adapter(model, name, device, info)
    if tokenizer is not None:
        adapter.tokenizer = tokenizer
    return adapter


def _tl_adapter(model, name: str, device: str, info: dict) -> ModelAdapter:
    def capture(tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        fwd_hooks = []
        for hook in hooks:
            m = HEAD_SUFFIX.match(hook)
            base, head = (m["base"], int(m["head"])) if m else (hook, None)

            def fn(act, hook=None, key=hook, head=head):
                if head is not None:
                    act = act[:, :, head]
                elif act.ndim == 4:  # (batch, pos, head, d_head): flatten over heads
                    act = act.flatten(2)
                out[key] = act.detach()

            fwd_hooks.append((base, fn))
        stop = _tl_stop_layer([HEAD_SUFFIX.sub(r"\g<base>", h) for h in hooks], model.cfg.n_layers)
        model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, stop_at_layer=stop, return_type=None)
        return out

    return ModelAdapter(
        name=name, kind="transformer_lens", model=model, tokenizer=getattr(model, "tokenizer", None),
        n_ctx=model.cfg.n_ctx, device=device, info=info, _capture=capture, valid_hooks=list(model.hook_dict),
    )


def _config_hash(cfg: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_tiny(device: str) -> ModelAdapter:
    from cache_writer.byte_tokenizer import ByteTokenizer
    from cache_writer.tiny_model import TINY_MODEL_DIR, load_tiny_model

    model = load_tiny_model(device=device)
    cfg = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    adapter = _tl_adapter(model, "tiny", device, {
        "name": "tiny", "source": "shipped", "kind": "transformer_lens",
        "config_hash": _config_hash(cfg["hooked_transformer_config"]),
        "weights_xxh3_64": _file_hash(TINY_MODEL_DIR / "model.safetensors"),
    })
    adapter.tokenizer = ByteTokenizer()
    return adapter


def _file_hash(path: Path) -> str:
    from pipeline.integrity import file_checksum

    return file_checksum(path)


def _load_tl(name: str, device: str, dtype: str, kwargs: dict) -> ModelAdapter:
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = HookedTransformer.from_pretrained(name, device=device, dtype=dtype, **kwargs)
        except OSError as e:
            raise PipelineError(
                f"could not load model {name!r} ({str(e).splitlines()[0]}); it must be downloaded once "
                "while online (or set HF_HUB_OFFLINE=0)"
            ) from None
    model.eval()
    info = {"name": name, "source": "transformer_lens", "kind": "transformer_lens", "dtype": dtype,
            "kwargs": kwargs, "config_hash": _config_hash(model.cfg.to_dict())}
    return _tl_adapter(model, name, device, info)


# ------------------------------------------------------------------------------ Hugging Face


def module_output(output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        output = output[0]
    if hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    return output


def per_token(act: torch.Tensor, batch: int, seq: int, hook: str) -> torch.Tensor:
    """A module's output as (batch, seq, d). Some modules see the tokens flattened (OPT's fc1/fc2
    give (batch * seq, d)): viewed back; any other shape is refused, naming the hook."""
    if act.ndim == 3 and tuple(act.shape[:2]) == (batch, seq):
        return act
    if act.ndim == 2 and act.shape[0] == batch * seq:
        return act.reshape(batch, seq, act.shape[1])
    raise PipelineError(
        f"hook {hook}: the module's output has shape {tuple(act.shape)}, not (batch, seq, d) = ({batch}, {seq}, d) "
        "or (batch * seq, d); hook a module with one row per token (e.g. the whole layer)"
    )


def hf_dtype_kwarg(dtype: str) -> dict[str, torch.dtype]:
    """`from_pretrained`'s dtype option: `dtype=` from transformers 4.56 (which warns on every load
    about the older `torch_dtype=`), `torch_dtype=` before it."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: getattr(torch, dtype)}


def _load_hf(path: str, device: str, dtype: str, kwargs: dict, trust_remote_code: bool) -> ModelAdapter:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, **hf_dtype_kwarg(dtype), trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise PipelineError(f"could not load Hugging Face model {path!r}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a bare checkpoint; the caller may pass --tokenizer
    modules = dict(model.named_modules())

    def capture(tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        handles = []

        def make(key):
            def fn(module, inputs, output):
                out[key] = module_output(output).detach()
                if len(out) == len(hooks):
                    raise _StopForward
            return fn

        for hook in hooks:
            handles.append(modules[hook].register_forward_hook(make(hook)))
        try:
            model(input_ids=tokens, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {key: per_token(act, *tokens.shape, key) for key, act in out.items()}

    cfg = model.config.to_dict()
    n_ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    info = {"name": str(path), "source": "huggingface", "kind": "huggingface", "dtype": dtype, "kwargs": kwargs,
            "config_hash": _config_hash(cfg), "architecture": cfg.get("architectures")}
    return ModelAdapter(name=str(path), kind="huggingface", model=model, tokenizer=tokenizer, n_ctx=n_ctx,
                        device=device, info=info, _capture=capture,
                        valid_hooks=[n for n in modules if n])


# ------------------------------------------------------------------------------ hook presets

PRESETS = {"mlp": "every layer's MLP input (as circuit-tracer's transcoders read it) and output"}
"""Named sets of hooks that expand to a model's layers (`pipeline cache --preset`)."""

# A Hugging Face block's MLP input is the output of its second norm: GPT-2's ln_2, Llama's and most
# others' post_attention_layernorm; its output is the block's `mlp` module.
HF_MLP_INPUT = re.compile(r"^(?P<blocks>.+)\.(?P<layer>\d+)\.(?:ln_2|post_attention_layernorm)$")


def preset_hooks(adapter: ModelAdapter, preset: str) -> list[str]:
    """The hooks `preset` names on this model, layer by layer. `mlp`: each layer's MLP input and
    output, (`blocks.{l}.ln2.hook_normalized`, `blocks.{l}.hook_mlp_out`) in TransformerLens, as
    circuit-tracer's transcoder sets name them (`blocks.{l}.hook_resid_mid` where a model has no
    normalisation); a Hugging Face model's (`<blocks>.{l}.ln_2` or `.post_attention_layernorm`,
    `<blocks>.{l}.mlp`) by module path. TransformerLens's hook_normalized is the normalised residual
    before the norm's elementwise scale and bias (which a transcoder's encoder absorbs): what
    circuit-tracer's ReplacementModel reads there, with its norms folded or not."""
    if preset not in PRESETS:
        raise PipelineError(f"unknown hook preset {preset!r}; presets: "
                            + "; ".join(f"{k} ({v})" for k, v in PRESETS.items()))
    if adapter.kind == "transformer_lens":
        valid = set(adapter.valid_hooks)
        hooks = []
        for layer in range(adapter.model.cfg.n_layers):
            mlp_in = f"blocks.{layer}.ln2.hook_normalized"
            hooks += [mlp_in if mlp_in in valid else f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out"]
        return hooks
    found = sorted(((int(m["layer"]), m[0], f"{m['blocks']}.{m['layer']}.mlp") for m in map(HF_MLP_INPUT.match,
                    adapter.valid_hooks) if m and f"{m['blocks']}.{m['layer']}.mlp" in adapter.valid_hooks))
    if not found:
        raise PipelineError(f"model {adapter.name} has no modules named like <blocks>.<layer>.ln_2 or "
                            ".post_attention_layernorm beside <blocks>.<layer>.mlp: name its MLP inputs and outputs "
                            "with --hook instead of --preset mlp")
    return [hook for _, mlp_in, mlp_out in found for hook in (mlp_in, mlp_out)]


# ------------------------------------------------------------------------------ entry point


def load_model(name: str, device: str = "cpu", dtype: str = "float32", model_kwargs: dict | None = None,
               trust_remote_code: bool = False) -> ModelAdapter:
    """'tiny', a TransformerLens model name, a local Hugging Face checkpoint dir, or 'hf:<hub id>'."""
    kwargs = dict(model_kwargs or {})
    if name == "tiny":
        return _load_tiny(device)
    if name.startswith("hf:"):
        return _load_hf(name[3:], device, dtype, kwargs, trust_remote_code)
    if Path(name).is_dir():
        if (Path(name) / "config.json").is_file():
            return _load_hf(name, device, dtype, kwargs, trust_remote_code)
        raise PipelineError(f"model directory {name!r} has no config.json; pass a Hugging Face checkpoint dir")
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        near = difflib.get_close_matches(name, list(OFFICIAL_MODEL_NAMES) + ["tiny"], n=5, cutoff=0.4)
        raise PipelineError(
            f"unknown model {name!r}: not 'tiny', a TransformerLens model name, a local Hugging Face "
            f"checkpoint directory, or 'hf:<hub id>'" + (f"; did you mean: {', '.join(near)}" if near else "")
        ) from None
    return _load_tl(official, device, dtype, kwargs)
