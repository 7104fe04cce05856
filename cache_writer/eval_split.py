"""Which tokens of a document stream go to the `eval` split.

Documents are cut into pieces of one context (a shorter document is one piece), so that even a
single long file gives many units to choose from. A piece goes to `eval` by a fixed hash of its key
(the document's key and the piece's index), steered: a piece of n tokens is held out when its hash
is below (eval tokens owed) / n, so the eval tokens never stray more than one piece from their
target, the fraction of the tokens seen so far. The target is raised (or lowered) so that each
split gets one context's worth as soon as the stream holds two: a small cache still has both.

A decision depends only on the stream before the piece, never on how much of it is cached, so a
resumed or extended cache, and one written by several processes (each reads the whole stream),
splits exactly as one uninterrupted process does.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache_writer.stdlib_corpus import key_hash

RULE = "pieces of context_size tokens, by sha256 of 'key#piece', steered to the fraction"
"""Recorded in the cache's config: a resume must split as the cache was split."""


@dataclass
class EvalSplitter:
    """The split of each piece of a stream, in stream order (see the module docstring)."""

    fraction: float
    """Share of the tokens held out as eval (0: none)."""
    minimum: int
    """Tokens each split gets first (one context), as soon as the stream has twice as many."""
    seen: int = 0
    """Tokens of the stream so far."""
    held: int = 0
    """Of those, tokens held out as eval."""

    def target(self, seen: int) -> float:
        """Eval tokens wanted after `seen` tokens: the fraction, but at least `minimum` for each split."""
        m = self.minimum
        return min(max(self.fraction * seen, min(m, seen - m)), max(seen - m, m))

    def split(self, key: str, n: int) -> str:
        """'train' or 'eval' for the next piece, of `n` tokens, named `key`."""
        if self.fraction <= 0 or n <= 0:
            return "train"
        lag = self.target(self.seen + n) - self.held  # eval tokens owed once this piece is counted
        held = key_hash(key) * n < lag  # probability lag / n, clipped to [0, 1]
        self.seen += n
        self.held += n if held else 0
        return "eval" if held else "train"
