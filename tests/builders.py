"""What several test files build: tiny caches, synthetic batches, stacks of runs, a tiny OPT model.
(A helper module, not a test module: test files import from here, never from each other.)"""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import torch

from pipeline.writer import ActivationBlock, CacheWriter, WriterConfig
from trainer.export import export_saelens
from trainer.registry import get_architecture
from trainer.sae_batchtopk import BatchTopKConfig
from trainer.sae_gated import GatedConfig
from trainer.sae_jumprelu import JumpReLUConfig
from trainer.sae_matryoshka import MatryoshkaConfig
from trainer.sae_standard import StandardConfig, StandardSAE
from trainer.sae_topk import TopKConfig
from trainer.train import LoopConfig, StackTrainer


ARCHS = ["batchtopk", "jumprelu", "gated", "matryoshka"]


def sparse_batches(n: int, batch: int, d: int = 32, n_feat: int = 64, k: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """As tests/test_train_loop.py's `sparse_cache`, in memory: rows are sparse non-negative
    combinations (k of n_feat, coefficients in [0.5, 1.5)) of fixed unit directions, plus an offset
    of 3. `seed` draws the rows; the directions are the same for every seed."""
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=torch.Generator().manual_seed(0)), dim=1)
    g = torch.Generator().manual_seed(1000 + seed)
    out = []
    for _ in range(n):
        idx = torch.rand(batch, n_feat, generator=g).argsort(dim=1)[:, :k]
        coef = torch.zeros(batch, n_feat).scatter_(1, idx, torch.rand(batch, k, generator=g) + 0.5)
        out.append(coef @ dirs + 3.0)
    return out


def stack_configs(arch: str, d_in: int, d_sae: int) -> list:
    """Three runs with different seeds and per-run hyper-parameters (shared fields shared)."""
    if arch == "batchtopk":  # low dead thresholds so that AuxK takes part
        return [BatchTopKConfig(d_in=d_in, d_sae=d_sae, k=k, seed=s, dead_tokens_threshold=t, threshold_lr=lr)
                for s, k, t, lr in [(0, 2, 128, 0.01), (1, 4, 192, 0.05), (2, 8, 256, 0.2)]]
    if arch == "matryoshka":
        return [MatryoshkaConfig(d_in=d_in, d_sae=d_sae, k=k, seed=s, dead_tokens_threshold=t, aux_k=a)
                for s, k, t, a in [(0, 2, 128, None), (1, 4, 192, 6), (2, 8, 256, 3)]]
    if arch == "jumprelu":
        return [JumpReLUConfig(d_in=d_in, d_sae=d_sae, l0_coefficient=c, init_threshold=t, bandwidth=b,
                               l0_warmup_steps=10, seed=s)
                for s, c, t, b in [(0, 0.1, 0.1, 0.03), (1, 0.3, 0.2, 0.05), (2, 1.0, 0.3, 0.1)]]
    return [GatedConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=c, l1_warmup_steps=10, seed=s)
            for s, c in [(0, 0.5), (1, 1.0), (2, 2.0)]]


def sparse_cache(path, rows=20_000, d=32, n_feat=64, k=3, seed=0, eval_rows=0):
    """Rows are sparse non-negative combinations of unit directions, plus an offset (a large mean);
    `eval_rows` more of them form the eval split."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    w = CacheWriter(path, {"x": d}, WriterConfig(shard_mb=0.5))
    for start in range(0, rows + eval_rows, 2000):
        idx = torch.rand(2000, n_feat, generator=g).argsort(dim=1)[:, :k]
        coef = torch.zeros(2000, n_feat).scatter_(1, idx, torch.rand(2000, k, generator=g) + 0.5)
        w.put(ActivationBlock({"x": coef @ dirs + 3.0}, split="train" if start < rows else "eval"))
    w.close()


def small_corpus(root: Path) -> str:
    """40 documents of up to 2,000 bytes, each a slice of one of the stdlib's own sources."""
    from cache_writer.stdlib_corpus import stdlib_files

    files = stdlib_files()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (root / f"doc{i:02d}.py").write_bytes(files[i * 7][1].read_bytes()[:2000])
    return str(root)


def tiny_opt(path: Path) -> Path:
    """A random-weight 2-layer OPT saved locally: its fc1/fc2 see the tokens flattened, (batch * seq, d)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=257, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                             ffn_dim=64, num_attention_heads=4, max_position_embeddings=64)).save_pretrained(path)
    return path


def aux_configs(arch: str) -> list:
    """Two or three runs with low dead-token thresholds, so AuxK takes part after a few steps."""
    if arch == "topk":
        return [TopKConfig(d_in=32, d_sae=128, k=k, seed=s, dead_tokens_threshold=128, aux_k=8)
                for s, k in enumerate((4, 8))]
    if arch == "standard":
        return [StandardConfig(d_in=32, d_sae=128, l1_coefficient=c, l1_warmup_steps=10, seed=s)
                for s, c in enumerate((0.5, 2.0))]
    return stack_configs(arch, 32, 128)


# The path kernels="auto" takes on CUDA (StackedSAE.fused_on): what a GPU runs.
CUDA_PATH = {"standard": "plain", "jumprelu": "plain", "gated": "plain", "topk": "fused", "batchtopk": "fused",
             "matryoshka": "fused"}


def trainer_for(arch: str, kernels: str, target_l0: list | None = None) -> tuple[StackTrainer, list[torch.Tensor]]:
    model = get_architecture(arch)(aux_configs(arch))
    if hasattr(model, "selection"):
        model.selection = "topk"  # BatchTopK's selection on a GPU
    tr = StackTrainer(model, LoopConfig(lr=1e-3, lr_warmup_steps=3, lr_decay="cosine", total_steps=20,
                                        kernels=kernels, target_l0=target_l0))
    data = sparse_batches(8, 128, d=32)
    tr.init_from_data(data[0])
    return tr, data


def relu_sae(out: Path, W_enc: torch.Tensor, W_dec: torch.Tensor, hook: str = "blocks.0.hook_resid_post") -> Path:
    """A standard (ReLU) SAE with zero biases, exported in SAELens's format."""
    d_in, d_sae = W_enc.shape
    model = StandardSAE([StandardConfig(d_in=d_in, d_sae=d_sae)])
    model.load_run(0, {"W_enc": W_enc, "W_dec": W_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in)}, {})
    return export_saelens(model, 0, out, {"hook_name": hook})


def chromium() -> str | None:
    """The headless browser the report tests open pages in, if one is installed."""
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class HTMLDom(HTMLParser):
    """ids, classes (with counts) and the body's attributes of an HTML document."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.classes: dict[str, int] = {}
        self.body: dict[str, str] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for c in (a.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        if tag == "body":
            self.body = {k: v or "" for k, v in a.items()}
