"""Logit effects of latents (`pipeline report`): tiny models whose unembedding makes the answer known,
TransformerLens and Hugging Face."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from analysis.logit_effects import APPROXIMATE, EXACT, NONE, direct_path, logit_effects, top_bottom, unembedding
from analysis.report import ReportConfig, build_report
from cache_writer.model_adapter import adapter_from_hooked_transformer, load_model
from cache_writer.run import CacheConfig, run_cache
from tests.builders import relu_sae

D = 16
A, B, C, Z = (ord(ch) for ch in "ABCz")  # byte tokens


def known_unembedding(n_vocab: int = 257) -> torch.Tensor:
    """(d_model, vocab): small noise, and four tokens along basis directions:
    A = 3 e0, B = 2 e1, C = -4 e1, z = 5 e2."""
    g = torch.Generator().manual_seed(0)
    W_U = torch.randn(D, n_vocab, generator=g) * 0.01
    for tok, dim, v in ((A, 0, 3.0), (B, 1, 2.0), (C, 1, -4.0), (Z, 2, 5.0)):
        W_U[:, tok] = 0.0
        W_U[dim, tok] = v
    return W_U


# Final norm weight: 0.1 on e0. Along the direction e0 + e1, A (3 e0) beats B (2 e1) without the
# norm's scale (3 > 2) and loses with it (0.3 < 2): the top token says whether the scale was applied.
NORM_WEIGHT = torch.ones(D)
NORM_WEIGHT[0] = 0.1
# Decoder rows: latent 0 = e0 + e1 (top B, bottom C); latent 1 = z's unembedding column (top z).
DIRECTIONS = torch.zeros(2, D)
DIRECTIONS[0, 0] = DIRECTIONS[0, 1] = 1.0
DIRECTIONS[1] = known_unembedding()[:, Z]


def tl_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=D, n_ctx=64, d_head=4, n_heads=4, d_mlp=32,
                                                      d_vocab=257, act_fn="gelu", normalization_type="LN")).eval()
    with torch.no_grad():
        model.unembed.W_U.copy_(known_unembedding())
        model.ln_final.w.copy_(NORM_WEIGHT)
    return model


def hf_model_dir(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=D, n_layer=2, n_head=2))
    with torch.no_grad():
        model.lm_head.weight.copy_(known_unembedding().T)  # tied to the input embedding
        model.transformer.ln_f.weight.copy_(NORM_WEIGHT)
    model.save_pretrained(path)
    return path


def check_known_answer(adapter, hook: str) -> None:
    eff = logit_effects(adapter, hook, DIRECTIONS)
    assert eff.exact and eff.values.shape == (2, 257)
    top, _, bottom, _ = top_bottom(eff.values[0], 3)
    assert top[0] == B and bottom[0] == C
    assert top_bottom(eff.values[1], 1)[0] == [Z]
    # Without the final norm's scale A would be on top: the scale is what puts B there.
    un = unembedding(adapter)
    assert torch.equal(un.scale.cpu(), NORM_WEIGHT) and un.center  # LayerNorm: the mean does not reach the logits
    raw = DIRECTIONS[0] - DIRECTIONS[0].mean()
    assert int((raw @ un.W_U.detach().cpu()).argmax()) == A


def test_transformer_lens_unembedding_gives_the_known_tokens():
    model = tl_model()
    adapter = adapter_from_hooked_transformer(model, "known")
    check_known_answer(adapter, "blocks.0.hook_resid_post")
    for hook in ("blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.0.hook_attn_out"):
        assert direct_path(adapter, hook, D, D).kind == EXACT
    approx = direct_path(adapter, "blocks.0.ln2.hook_normalized", D, D)
    assert approx.kind == APPROXIMATE and "approximation" in approx.note
    assert direct_path(adapter, "blocks.0.mlp.hook_pre", 32, D).kind == NONE
    # hook_z goes through W_O: a z direction equal to W_O's preimage of e0 + e1 gives the same answer.
    W_O = model.blocks[0].attn.W_O.detach()  # (heads, d_head, d_model)
    z = torch.linalg.lstsq(W_O.reshape(-1, D).T, DIRECTIONS[0:1].T).solution.T  # (1, heads * d_head)
    eff = logit_effects(adapter, "blocks.0.attn.hook_z", z)
    assert eff.exact and "W_O" in eff.note and top_bottom(eff.values[0], 1)[0] == [B]
    # mlp hook_post goes through W_out.
    post = torch.linalg.lstsq(model.blocks[0].mlp.W_out.detach().T, DIRECTIONS[0:1].T).solution.T
    eff = logit_effects(adapter, "blocks.0.mlp.hook_post", post)
    assert eff.exact and top_bottom(eff.values[0], 1)[0] == [B]


def test_hugging_face_unembedding_gives_the_known_tokens(tmp_path):
    adapter = load_model(str(hf_model_dir(tmp_path / "gpt2")))
    assert unembedding(adapter).norm.startswith("transformer.ln_f")
    check_known_answer(adapter, "transformer.h.1")
    assert direct_path(adapter, "transformer.h.0.mlp", D, D).kind == EXACT
    assert direct_path(adapter, "transformer.h.0.ln_2", D, D).kind == APPROXIMATE


def _latent_table(page: str, latent: int) -> list[str]:
    """The tokens of a latent's logit table on the page, top side first, in row order."""
    block = page[page.index(f'id="latent-{latent}"'):]
    block = block[block.index('class="logit-table"'):block.index("</table>")]
    return re.findall(r'<td class="tokcell (pos|neg)"[^>]*>([^<]*)</td>', block)


def _report(tmp_path: Path, cache: Path, hook: str, **kwargs) -> str:
    W_dec = torch.cat([DIRECTIONS, torch.randn(6, D) * 0.1])
    sae = relu_sae(tmp_path / "sae", torch.randn(D, 8), W_dec, hook)
    page = build_report(ReportConfig(sae=str(sae), cache=str(cache), out=str(tmp_path / "report"), latents=[0, 1],
                                     contexts=2, device="cpu", **kwargs))
    return page.read_text(encoding="utf-8")


def test_report_shows_logit_tables_for_both_model_kinds(tmp_path):
    # Hugging Face: the cache names the checkpoint, the report loads it.
    model_dir = hf_model_dir(tmp_path / "gpt2")
    run_cache(CacheConfig(out=str(tmp_path / "hf"), model=str(model_dir), tokenizer="bytes", hooks=["transformer.h.1"],
                          context_size=32, tokens=1500, eval_fraction=0.5), progress=False)
    page = _report(tmp_path / "a", tmp_path / "hf", "transformer.h.1")
    cells = _latent_table(page, 0)
    assert cells[0] == ("pos", "B") and ("neg", "C") == [c for c in cells if c[0] == "neg"][0]
    assert _latent_table(page, 1)[0] == ("pos", "z")
    assert page.count('class="logit-histogram"') == 2 and "APPROXIMATION" not in page
    # TransformerLens, the model held in memory and given to the report.
    model = tl_model()
    run_cache(CacheConfig(out=str(tmp_path / "tl"), tokenizer="bytes", hooks=["blocks.0.hook_resid_post",
                                                                             "blocks.0.ln2.hook_normalized"],
                          context_size=32, tokens=1500, eval_fraction=0.5),
              adapter=adapter_from_hooked_transformer(model, "known"), progress=False)
    page = _report(tmp_path / "b", tmp_path / "tl", "blocks.0.hook_resid_post", model=model)
    assert _latent_table(page, 0)[0] == ("pos", "B") and _latent_table(page, 1)[0] == ("pos", "z")
    # Not in the residual stream: shown, and labelled an approximation, on the page and per latent.
    page = _report(tmp_path / "c", tmp_path / "tl", "blocks.0.ln2.hook_normalized", model=model)
    assert "APPROXIMATION: " in page and "blocks.0.ln2.hook_normalized is not the residual stream" in page
    assert page.count('class="approximation"') == 2
    # Without the model (held in memory, not given): no tables, and the summary says why.
    page = _report(tmp_path / "d", tmp_path / "tl", "blocks.0.hook_resid_post")
    assert 'class="logit-table"' not in page and "not shown: the cache was written from a model held in memory" in page
