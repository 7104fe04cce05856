"""Fused training kernels: hand-written forward/backward pairs that an architecture's forward may
take instead of autograd through its plain formulas (`StackedSAE.kernels`, `--kernels`).

- `relu`: the standard SAE's step; `jumprelu`, `gated`: theirs (latent-major, chunked passes).
- `sparse`: the TopK family's sparse decoder and encoder gradients (fixed k per token, or a
  variable number per token as compressed rows: BatchTopK, Matryoshka), and BatchTopK's selection.
- `chunks`: how the elementwise passes are cut (`Chunks`, an argument of every kernel) and the small
  tensor helpers the kernels share.

Each kernel is tested equal to the plain path it replaces (tests/test_kernel_switch.py and the
kernel tests); measured speeds are in BENCHMARKS.md.
"""
