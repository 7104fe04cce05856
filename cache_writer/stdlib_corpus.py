"""Offline text corpus: the running interpreter's own standard-library ``.py`` sources.

Every Python install ships these files, so tests and the tiny model need no
network. The content depends on the Python version, so ``stdlib_revision()``
is recorded as the dataset revision wherever the corpus is used.
"""

import hashlib
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import datasets

STDLIB_DATASET_ID = "python-stdlib"

# Third-party packages can live under the stdlib dir; they would make the corpus env-dependent.
_EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_files() -> list[tuple[str, Path]]:
    """Return ``(relative POSIX path, absolute path)`` for each stdlib ``.py`` file, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_PARTS.intersection(rel.parts) or not path.is_file():
            continue
        files.append((rel.as_posix(), path))
    # rglob order is filesystem-dependent; sorting makes splits and hashes reproducible.
    files.sort(key=lambda item: item[0])
    return files


def key_hash(key: str) -> float:
    """A fixed pseudo-random number in [0, 1) for a key: sha256(key)[:8] / 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def is_heldout(relpath: str, eval_fraction: float = 0.05) -> bool:
    """Fixed hash rule: a file is held out iff key_hash(relpath) < eval_fraction."""
    # Hashing the path (not the content) keeps a file's split stable across Python versions.
    return key_hash(relpath) < eval_fraction


def stdlib_revision() -> dict:
    """Describe exactly which corpus was used: Python version, file count, and a listing hash.

    ``files_hash`` is the sha256 hex of the lines ``"{relpath}\t{size_in_bytes}"`` joined by newlines.
    """
    files = stdlib_files()
    lines = [f"{rel}\t{path.stat().st_size}" for rel, path in files]
    files_hash = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    return {
        "python_version": platform.python_version(),
        "n_files": len(files),
        "files_hash": files_hash,
    }


def load_stdlib_dataset(split: str = "all", eval_fraction: float = 0.05) -> datasets.Dataset:
    """Load the corpus as an in-memory Dataset with ``text`` and ``path`` columns.

    ``split`` is "train" (not held out), "eval" (held out) or "all".
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    texts: list[str] = []
    paths: list[str] = []
    for rel, path in stdlib_files():
        if split != "all" and is_heldout(rel, eval_fraction) != (split == "eval"):
            continue
        # A few stdlib test files hold deliberately invalid encodings; replace rather than fail.
        texts.append(path.read_bytes().decode("utf-8", errors="replace"))
        paths.append(rel)
    return datasets.Dataset.from_dict({"text": texts, "path": paths})


def _stdlib_rows() -> Iterator[dict]:
    # Hash order, not alphabetical: any prefix of the stream (a small cache) mixes the whole
    # library, and held-out files turn up throughout instead of in a few alphabetical runs.
    files = sorted(stdlib_files(), key=lambda f: hashlib.sha256(f[0].encode()).digest()[8:16])
    for rel, path in files:
        yield {"text": path.read_bytes().decode("utf-8", errors="replace"), "path": rel}


def stream_stdlib_dataset() -> datasets.IterableDataset:
    """All files, in a fixed pseudo-random order, as a lazily read IterableDataset (`text`, `path`)."""
    return datasets.IterableDataset.from_generator(_stdlib_rows)
