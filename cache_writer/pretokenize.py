"""`pipeline pretokenize`: tokenize and pack a dataset once (as SAELens's PretokenizeRunner).

The result is a `datasets` directory with `input_ids` (context_size ids per row) and `split`
('train'/'eval', decided per document before packing), which `pipeline cache --dataset DIR` reads
without tokenizing again.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from cache_writer.text_source import iter_sequences, open_documents
from pipeline.config import check_fraction, check_sizes
from pipeline.errors import PipelineError


def load_named_tokenizer(name: str) -> Any:
    """'bytes' (the tiny model's) or a Hugging Face tokenizer name or path."""
    if name == "bytes":
        from cache_writer.byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _rows(dataset: str | None, dataset_split: str, column: str | None, tokenizer_name: str, context_size: int,
          eval_fraction: float, max_sequences: int | None) -> Iterator[dict]:
    # Top-level with plain arguments: `datasets` hashes the generator and its kwargs for caching.
    from cache_writer.run import special_ids

    tokenizer = load_named_tokenizer(tokenizer_name)
    bos, sep, _ = special_ids(tokenizer)
    rows = iter_sequences(open_documents(dataset, column, dataset_split), tokenizer, context_size, eval_fraction,
                          bos, sep)
    for split, ids in itertools.islice(rows, max_sequences):
        yield {"input_ids": ids, "split": split}


def pretokenize(out: str, dataset: str | None, dataset_split: str, column: str | None, tokenizer_name: str,
                context_size: int, eval_fraction: float, max_sequences: int | None) -> int:
    import datasets

    check_sizes(SimpleNamespace(context_size=context_size, max_sequences=max_sequences),
                positive=("context_size", "max_sequences"))
    check_fraction(eval_fraction, "--eval-fraction")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise PipelineError(f"{out} is not empty; choose a new directory for --out")
    if open_documents(dataset, column, dataset_split).pretokenized:
        raise PipelineError(f"dataset {dataset!r} is already tokenized")
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=context_size),
                                  "split": datasets.Value("string")})
    kwargs = dict(dataset=dataset, dataset_split=dataset_split, column=column, tokenizer_name=tokenizer_name,
                  context_size=context_size, eval_fraction=eval_fraction, max_sequences=max_sequences)
    with tempfile.TemporaryDirectory() as build:
        ds = datasets.Dataset.from_generator(_rows, features=features, gen_kwargs=kwargs, cache_dir=build)
        ds.save_to_disk(out)
        return len(ds)
