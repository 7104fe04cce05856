"""Documents in, packed token sequences out, each tagged with its split.

Sources: the embedded stdlib corpus (default, offline), a local `datasets` directory, local text
files, or a Hugging Face dataset by name (streamed). A `text` column is tokenized; an `input_ids`
or `tokens` column is used as is (pre-tokenized; rows already of the context size are kept whole).

Splits: documents go to `eval` in pieces of one context, by a fixed hash of their key (the file's
relative path, or the row index) and the piece's index, steered to the fraction, before anything
is shuffled (cache_writer.eval_split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cache_writer.eval_split import EvalSplitter
from cache_writer.packing import Packer
from cache_writer.stdlib_corpus import STDLIB_DATASET_ID, stdlib_revision, stream_stdlib_dataset
from pipeline.errors import PipelineError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
TOKEN_COLUMNS = ("input_ids", "tokens")


@dataclass
class DocumentSource:
    """An iterable of (key, text or token ids) plus what identifies it in a manifest."""

    documents: Any
    provenance: dict
    column: str
    pretokenized: bool


def _pick_column(columns: list[str], column: str | None, name: str) -> tuple[str, bool]:
    if column is not None:
        if column not in columns:
            raise PipelineError(f"dataset {name!r} has no column {column!r}; its columns are: {', '.join(columns)}")
        return column, column in TOKEN_COLUMNS
    if "text" in columns:
        return "text", False
    for c in TOKEN_COLUMNS:
        if c in columns:
            return c, True
    raise PipelineError(
        f"dataset {name!r} has no 'text', 'input_ids' or 'tokens' column (it has: {', '.join(columns)}); "
        "name one with --column"
    )


def _rows(dataset, column: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(dataset):
        # A pretokenized dataset of ours carries each row's split; keep it rather than re-hash.
        yield (f"split:{row['split']}" if "split" in row else str(i)), row[column]


def open_documents(dataset: str | None, column: str | None = None, split: str = "train") -> DocumentSource:
    """Open a document source by name: None/'stdlib', a local path, or a Hugging Face dataset id."""
    if dataset in (None, "", "stdlib", STDLIB_DATASET_ID):
        ds = stream_stdlib_dataset()  # both splits: the hash rule below holds files out
        docs = ((row["path"], row["text"]) for row in ds)
        prov = {"name": STDLIB_DATASET_ID, "split": "all", "revision": stdlib_revision()}
        return DocumentSource(docs, prov, "text", False)
    path = Path(dataset)
    if path.exists():
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise PipelineError(f"dataset {dataset!r} has no split {split!r}; it has: {', '.join(ds)}")
                ds = ds[split]
            col, pretok = _pick_column(ds.column_names, column, dataset)
            prov = {"name": str(path.resolve()), "split": split, "revision": ds._fingerprint}
            return DocumentSource(_rows(ds, col), prov, col, pretok)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise PipelineError(f"{dataset} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        root = path if path.is_dir() else path.parent
        docs = ((p.relative_to(root).as_posix(), p.read_text(errors="replace")) for p in files)
        prov = {"name": str(path.resolve()), "split": "all", "revision": {"n_files": len(files)}}
        return DocumentSource(docs, prov, "text", False)
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=True)
        columns = list(ds.features) if ds.features else list(next(iter(ds)).keys())
    except Exception as e:  # datasets raises many types for offline / missing repos
        raise PipelineError(
            f"could not open dataset {dataset!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "pass a Hugging Face dataset id (online), a local `datasets` directory, or text files"
        ) from None
    col, pretok = _pick_column(columns, column, dataset)
    prov = {"name": dataset, "split": split, "revision": getattr(ds.info, "version", None) and str(ds.info.version)}
    return DocumentSource(_rows(ds, col), prov, col, pretok)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a document without the special tokens a tokenizer adds (packing adds BOS)."""
    try:
        return tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # the byte tokenizer has no special tokens to add
        return tokenizer.encode(text)


def iter_sequences(source: DocumentSource, tokenizer: Any, context_size: int, eval_fraction: float,
                   bos_token_id: int | None, sep_token_id: int | None) -> Iterator[tuple[str, list[int]]]:
    """Yield (split, context_size token ids) in a fixed order, packing each split on its own.

    Documents go to the splits in pieces of one context (cache_writer.eval_split); consecutive
    pieces of one document that land in the same split are packed as one document.
    """
    packers = {s: Packer(context_size, bos_token_id, sep_token_id) for s in ("train", "eval")}
    splitter = EvalSplitter(eval_fraction, minimum=context_size)
    last: dict[str, tuple[str, int] | None] = {"train": None, "eval": None}  # last piece fed to each packer
    for key, value in source.documents:
        given = key[len("split:"):] if key.startswith("split:") else None  # e.g. `pipeline pretokenize`'s rows
        tokens = [int(t) for t in value] if source.pretokenized else encode(tokenizer, value)
        if source.pretokenized and len(tokens) == context_size:  # already packed: one unit
            yield given or splitter.split(key, len(tokens)), tokens
            continue
        for i, start in enumerate(range(0, len(tokens), context_size)):
            piece = tokens[start:start + context_size]
            split = given or splitter.split(f"{key}#{i}", len(piece))
            rows = packers[split].feed(piece, continues=i > 0 and last[split] == (key, i - 1))
            last[split] = (key, i)
            for row in rows:
                yield split, row
