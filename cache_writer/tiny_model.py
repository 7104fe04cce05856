"""The shipped tiny byte-level transformer, loadable as a TransformerLens HookedTransformer.

Weights live in ``assets/tiny/`` as safetensors (never pickle) and are produced by
``python -m cache_writer.train_tiny_model`` (``make tiny-model``).
"""

import json
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

TINY_MODEL_DIR = Path(__file__).parent / "assets" / "tiny"
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"

# Only these fields are stored; everything else keeps TransformerLens defaults.
_TINY_CONFIG_FIELDS: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "d_mlp": 512,
    "n_ctx": 256,
    "d_vocab": 257,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "tokenizer_name": None,
    "default_prepend_bos": False,
    "model_name": "tiny-stdlib-bytes",
}


def tiny_model_config_dict() -> dict[str, Any]:
    """The default architecture as plain JSON-serialisable fields (what config.json stores)."""
    return dict(_TINY_CONFIG_FIELDS)


def tiny_model_config() -> HookedTransformerConfig:
    """Default architecture used for training; loading reads config.json instead."""
    return HookedTransformerConfig(**tiny_model_config_dict())


def build_model(cfg: HookedTransformerConfig, device: str = "cpu") -> HookedTransformer:
    """Construct a (randomly initialised) HookedTransformer without its deprecation noise."""
    cfg.device = device
    with warnings.catch_warnings():
        # TransformerLens 3.x flags HookedTransformer as deprecated; we rely on it deliberately.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        return HookedTransformer(cfg)


def load_tiny_model(device: str = "cpu", path: Path = TINY_MODEL_DIR) -> HookedTransformer:
    """Load the shipped tiny model from ``path`` in eval mode."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILENAME, path / WEIGHTS_FILENAME
    if not (config_path.is_file() and weights_path.is_file()):
        raise FileNotFoundError(
            f"tiny model files missing in {path} (need {CONFIG_FILENAME} and {WEIGHTS_FILENAME}); "
            "run `make tiny-model`"
        )
    meta = json.loads(config_path.read_text())
    # config.json is the source of truth so a retrained model with other shapes still loads.
    cfg = HookedTransformerConfig(**meta["hooked_transformer_config"])
    model = build_model(cfg, device=device)

    state = load_file(str(weights_path), device=str(model.cfg.device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only parameters are saved; attention masks etc. are buffers rebuilt by the constructor.
    buffer_names = {name for name, _ in model.named_buffers()}
    bad_missing = [k for k in missing if k not in buffer_names]
    if bad_missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match its config: missing={bad_missing} unexpected={list(unexpected)}"
        )
    return model.eval()
