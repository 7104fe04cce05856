"""Every export kind loads in SAELens with our encode and decode, the loader's scale folded in."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.export import export_saelens
from trainer.registry import get_architecture

# (our architecture, transcoder?) -> the `architecture` SAELens reads in cfg.json.
KINDS = {("standard", False): "standard", ("topk", False): "topk", ("jumprelu", False): "jumprelu",
         ("batchtopk", False): "jumprelu", ("matryoshka", False): "jumprelu", ("gated", False): "gated",
         ("standard", True): "transcoder", ("jumprelu", True): "jumprelu_transcoder",
         ("topk", True): "topk_transcoder"}


def _model(arch: str, transcoder: bool):
    cls = get_architecture(arch)
    extra = {"k": 6} if "k" in cls.config_class.__dataclass_fields__ else {}
    model = cls([cls.config_class(d_in=16, d_sae=48, seed=s, **extra, **({"d_out": 12} if transcoder else {}))
                 for s in range(2)])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # biases and thresholds away from their zero init, so every term counts
        for name, p in model.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if hasattr(model, "threshold_param"):
            model._set_threshold(torch.rand(2, 48, generator=g) * 0.3 + 0.05)
        elif hasattr(model, "threshold"):
            model.threshold.fill_(0.2)
        if transcoder:
            model.b_in.copy_(torch.randn(model.b_in.shape, generator=g))
    return model


@pytest.mark.parametrize("arch,transcoder", list(KINDS), ids=[v for v in KINDS.values()])
def test_every_export_kind_loads_in_saelens(tmp_path, arch, transcoder):
    """Run 1 of a stack trained on c * x (the loader's normalisation, c = 0.5; a transcoder's target
    scaled by 2): SAELens 6.x loads the export (the TopK transcoder after
    `register_topk_transcoder`) and its encode and decode on raw rows equal ours on scaled ones."""
    sae_lens = pytest.importorskip("sae_lens")
    from trainer.saelens_compat import register_topk_transcoder

    register_topk_transcoder()
    model = _model(arch, transcoder)
    c, c_out = 0.5, (2.0 if transcoder else None)
    export_saelens(model, 1, tmp_path / "sae", {"hook_name": "x"}, input_scale=c, output_scale=c_out)
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == KINDS[(arch, transcoder)]
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), device="cpu")
    assert sae.cfg.architecture() == KINDS[(arch, transcoder)]
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2)) * 2 + 1
    with torch.no_grad():
        ours = model.encode(c * x)[1]
        theirs = sae.encode(x)
        assert (ours > 0).any() and (ours == 0).any()
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        recon = model.decode(ours[None].expand(2, -1, -1))[1] / (c_out or c)
        torch.testing.assert_close(sae.decode(theirs), recon, atol=1e-5, rtol=1e-5)
