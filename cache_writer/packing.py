"""Pack tokenized documents into fixed-length rows, matching SAELens.

The rule is that of SAELens's ``concat_and_batch_sequences`` with
``begin_batch_token_id=BOS``, ``sequence_separator_token_id=SEP`` and
``begin_sequence_token_id=None``:

* Documents are concatenated in order; empty documents are skipped.
* Every emitted row starts with ``bos_token_id`` and is filled with the next
  ``context_size - 1`` tokens of that stream (``context_size`` tokens when
  ``bos_token_id`` is None).
* ``sep_token_id`` is inserted between two consecutive documents only when the
  new document starts in the middle of a row. When a row begins exactly at a
  document boundary no separator is emitted, so a row never starts ``BOS SEP``
  (``BOS BOS`` when both are the same id). A separator may be a row's last token.
* A document longer than a row simply continues in the next row, after its BOS.
* As in SAELens, a BOS (or separator) is not added when the token about to be
  placed already equals it, so documents that carry their own BOS also never
  produce ``BOS BOS``.
* A trailing partial row is dropped.

Rows are produced lazily, so ``token_lists`` may be an unbounded generator.
"""

from collections.abc import Iterable, Iterator


class Packer:
    """The packing rule, incremental: feed documents one at a time, get the rows they complete.

    Keeping one packer per split lets a single pass over a corpus pack train and eval documents
    apart (see `cache_writer.text_source.iter_sequences`).
    """

    def __init__(self, context_size: int, bos_token_id: int | None, sep_token_id: int | None):
        min_size = 1 if bos_token_id is None else 2
        if context_size < min_size:
            # A row holding only BOS could never consume document tokens: infinite loop.
            raise ValueError(f"context_size must be >= {min_size}, got {context_size}")
        self.context_size = context_size
        self.bos_token_id = bos_token_id
        self.sep_token_id = sep_token_id
        self.row: list[int] = []  # empty means "no row started yet"

    def feed(self, doc: list[int], continues: bool = False) -> list[list[int]]:
        """Add one document, or with `continues` the next piece of the last one (no separator
        between them); return the rows it completed (possibly none)."""
        done: list[list[int]] = []
        if len(doc) == 0:
            return done
        row, size, bos, sep = self.row, self.context_size, self.bos_token_id, self.sep_token_id
        if row and sep is not None and doc[0] != sep and not continues:
            row.append(sep)
            if len(row) == size:
                done.append(row)
                row = []
        offset = 0
        while offset < len(doc):
            if not row and bos is not None and doc[offset] != bos:
                row.append(bos)
            take = size - len(row)
            row.extend(doc[offset : offset + take])
            offset += take
            if len(row) == size:
                done.append(row)
                row = []
        self.row = row
        return done


def pack_sequences(
    token_lists: Iterable[list[int]],
    context_size: int,
    bos_token_id: int | None,
    sep_token_id: int | None,
) -> Iterator[list[int]]:
    """Yield rows of exactly ``context_size`` tokens; see the module docstring for the rule."""
    packer = Packer(context_size, bos_token_id, sep_token_id)
    for doc in token_lists:
        yield from packer.feed(doc)
