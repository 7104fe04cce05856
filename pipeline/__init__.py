"""Activation caches for sparse-autoencoder training: the format, the loader and the CLI."""

__version__ = "0.1.0"
