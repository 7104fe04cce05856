"""What SAELens lacks to load every export: our `topk_transcoder` and `topk_skip_transcoder` (docs/FORMAT.md).

SAELens 6.x has ReLU and JumpReLU transcoders (with and without a skip path) and TopK SAEs, but no
TopK transcoder: its `SAE.load_from_disk` fails on one with `KeyError: 'topk_transcoder'`.
`register_topk_transcoder()` adds both TopK kinds to SAELens's registry (SAELens's own `Transcoder`
and `SkipTranscoder` with its `TopK` activation), after which

    from trainer.saelens_compat import register_topk_transcoder
    register_topk_transcoder()
    sae = sae_lens.SAE.load_from_disk("runs/tc/topk-d1024-k32")

loads them with our encode and decode. Imports sae_lens only when called (it is not a dependency).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ARCHITECTURE = "topk_transcoder"
SKIP_ARCHITECTURE = "topk_skip_transcoder"


def register_topk_transcoder() -> type:
    """Register our `topk_transcoder` and `topk_skip_transcoder` export formats with SAELens (once);
    returns the first's SAE class."""
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class

    if ARCHITECTURE in SAE_CLASS_REGISTRY:
        return SAE_CLASS_REGISTRY[ARCHITECTURE][0]
    from sae_lens.saes.topk_sae import TopK
    from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig

    def topk_kind(base: type, base_config: type, name: str) -> type:
        """`base` (a SAELens transcoder class) with TopK latents, registered as `name`."""

        @dataclass
        class Config(base_config):
            """SAELens's config of `base` with TopK's `k` (and its flag, always false in our exports)."""

            k: int = 100
            rescale_acts_by_decoder_norm: bool = False

            @classmethod
            def architecture(cls) -> str:
                return name

        class Kind(base):
            """`base` whose latents are each row's top k pre-activations, ReLU'd."""

            def get_activation_fn(self):
                return TopK(self.cfg.k)

            @classmethod
            def from_dict(cls, config_dict: dict[str, Any]) -> "Kind":
                return cls(Config.from_dict(config_dict))

        Kind.__name__ = Kind.__qualname__ = "TopK" + base.__name__
        Config.__name__ = Config.__qualname__ = "TopK" + base_config.__name__
        register_sae_class(name, Kind, Config)
        return Kind

    topk_kind(SkipTranscoder, SkipTranscoderConfig, SKIP_ARCHITECTURE)
    return topk_kind(Transcoder, TranscoderConfig, ARCHITECTURE)
