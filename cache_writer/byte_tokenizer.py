"""Byte-level tokenizer for the tiny model: token ids 0-255 are raw UTF-8 bytes, 256 is BOS."""

from collections.abc import Iterable


class ByteTokenizer:
    """Maps text to UTF-8 bytes plus one extra BOS id (also the document separator)."""

    vocab_size: int = 257
    bos_token_id: int = 256
    name: str = "bytes"

    def encode(self, text: str) -> list[int]:
        # errors="replace" so lone surrogates in odd sources never abort a long caching run.
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Iterable[int]) -> str:
        # BOS carries no text; dropping it lets packed rows decode back to readable source.
        data = bytes(int(i) for i in ids if int(i) != self.bos_token_id)
        return data.decode("utf-8", errors="replace")

    def decode_token(self, token_id: int) -> str:
        """Render a single token for display (a lone byte may be an incomplete UTF-8 char)."""
        token_id = int(token_id)
        if token_id == self.bos_token_id:
            return "<bos>"
        if not 0 <= token_id < 256:
            raise ValueError(f"token id {token_id} outside byte vocabulary of size {self.vocab_size}")
        return bytes([token_id]).decode("utf-8", errors="replace")
