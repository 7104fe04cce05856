"""Stage 2b: SAE training on a cached activation set.

Every architecture here is written for a *stack* of R runs of the same shape (parameters carry a
leading run dimension, per-run hyper-parameters are `(R,)` tensors); a single run is R = 1. A sweep
stacks runs and steps them all on the same batch with batched arithmetic.

Modules:
- `registry`: architectures by name (`register_architecture`, `get_architecture`).
- `sae_topk`, `sae_standard`, `sae_batchtopk`, `sae_jumprelu`, `sae_gated`, `sae_matryoshka`: one
  architecture each, readable top to bottom.
- `init`: shared initialisation (per-run seeds, tied encoder, data-driven `b_dec`).
- `optim`: per-run Adam with per-run gradient clipping; decoder-norm constraints.
"""
