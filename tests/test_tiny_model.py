"""Fast tests for the byte tokenizer, packing rule, stdlib corpus and the shipped tiny model."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from cache_writer.byte_tokenizer import ByteTokenizer
from cache_writer.packing import pack_sequences
from cache_writer.stdlib_corpus import is_heldout, load_stdlib_dataset, stdlib_files
from cache_writer.tiny_model import TINY_MODEL_DIR, load_tiny_model

BOS = 256


# --- packing ---------------------------------------------------------------------------


def test_packing_rows_start_with_bos_and_have_fixed_length() -> None:
    docs = [list(range(10)), list(range(100, 107)), list(range(200, 213))]
    rows = list(pack_sequences(docs, 8, BOS, BOS))
    assert rows, "expected at least one row"
    assert all(len(r) == 8 and r[0] == BOS for r in rows)


def test_packing_matches_saelens_rule_exactly() -> None:
    # Stream: a0..a4 SEP b0..b2 SEP c0..c5; each row is BOS + 3 stream tokens.
    a, b, c = [1, 2, 3, 4, 5], [11, 12, 13], [21, 22, 23, 24, 25, 26]
    rows = list(pack_sequences([a, b, c], 4, BOS, BOS))
    assert rows == [
        [BOS, 1, 2, 3],
        [BOS, 4, 5, BOS],  # separator may end a row
        [BOS, 11, 12, 13],
        # b ended exactly at the row end: the new row starts with c, not BOS BOS.
        [BOS, 21, 22, 23],
        [BOS, 24, 25, 26],
    ]


def test_packing_separates_documents_mid_row() -> None:
    rows = list(pack_sequences([[1, 2], [3, 4], [5, 6, 7]], 8, BOS, 999))
    assert rows == [[BOS, 1, 2, 999, 3, 4, 999, 5]]  # trailing 6, 7 dropped


def test_packing_never_emits_bos_bos() -> None:
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 256, size=int(n))) for n in rng.integers(1, 40, size=300)]
    rows = list(pack_sequences(docs, 16, BOS, BOS))
    assert rows
    for row in rows:
        assert row[1] != BOS
        assert all(not (x == BOS and y == BOS) for x, y in zip(row, row[1:]))
    # Every document token survives in order apart from the dropped tail.
    stream = [t for r in rows for t in r[1:] if t != BOS]
    flat = [int(t) for d in docs for t in d]
    assert stream == flat[: len(stream)]


def test_packing_drops_trailing_partial_row() -> None:
    assert list(pack_sequences([[1, 2, 3]], 8, BOS, BOS)) == []
    rows = list(pack_sequences([list(range(10))], 4, BOS, BOS))
    assert rows == [[BOS, 0, 1, 2], [BOS, 3, 4, 5], [BOS, 6, 7, 8]]  # token 9 dropped


def test_packing_without_bos_is_plain_slices() -> None:
    rows = list(pack_sequences([[1, 2, 3], [4, 5, 6, 7]], 3, None, None))
    assert rows == [[1, 2, 3], [4, 5, 6]]


def test_packing_does_not_double_a_bos_the_document_already_has() -> None:
    rows = list(pack_sequences([[BOS, 1, 2], [BOS, 3, 4, 5, 6]], 4, BOS, BOS))
    assert rows == [[BOS, 1, 2, BOS], [BOS, 3, 4, 5]]


def test_packing_skips_empty_documents() -> None:
    assert list(pack_sequences([[1], [], [2, 3]], 4, BOS, BOS)) == [[BOS, 1, BOS, 2]]


def test_packing_is_lazy_on_infinite_generator() -> None:
    pulled = 0

    def docs():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield [i % 256] * 5

    rows = list(itertools.islice(pack_sequences(docs(), 8, BOS, BOS), 3))
    assert len(rows) == 3
    assert pulled < 10


# --- tokenizer -------------------------------------------------------------------------


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "def f(x):\n    return x * 2  # héllo ✓"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *ids]) == text
    assert tok.decode_token(tok.bos_token_id) == "<bos>"
    assert tok.decode_token(ord("a")) == "a"
    assert (tok.vocab_size, tok.bos_token_id, tok.name) == (257, 256, "bytes")


# --- stdlib corpus ---------------------------------------------------------------------


def test_is_heldout_is_deterministic_and_holds_out_about_the_fraction() -> None:
    rels = [rel for rel, _ in stdlib_files()]
    assert len(rels) > 100
    held = [is_heldout(r) for r in rels]
    assert held == [is_heldout(r) for r in rels]
    assert 0.02 <= sum(held) / len(rels) <= 0.09


def test_stdlib_dataset_columns_and_disjoint_splits() -> None:
    train = load_stdlib_dataset("train")
    evals = load_stdlib_dataset("eval")
    assert set(train.column_names) == {"text", "path"}
    assert set(evals.column_names) == {"text", "path"}
    train_paths, eval_paths = set(train["path"]), set(evals["path"])
    assert train_paths and eval_paths
    assert not train_paths & eval_paths
    assert len(train_paths) + len(eval_paths) == len(stdlib_files())
    with pytest.raises(ValueError):
        load_stdlib_dataset("validation")


# --- shipped tiny model ----------------------------------------------------------------


def test_tiny_model_heldout_loss_is_low() -> None:
    model = load_tiny_model("cpu")
    assert not model.training
    tok = ByteTokenizer()
    docs = (tok.encode(t) for t in load_stdlib_dataset("eval")["text"])
    rows = list(itertools.islice(pack_sequences(docs, 128, BOS, BOS), 4))
    with torch.no_grad():
        loss = model(torch.tensor(rows), return_type="loss").item()
    assert loss < 3.0


def test_shipped_config_records_low_heldout_loss() -> None:
    meta = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert meta["eval"]["heldout_loss_nats_per_byte"] < math.log(256) / 2
    assert meta["bos_token_id"] == BOS and meta["context_size"] == 128


def test_load_tiny_model_missing_files_says_how_to_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="make tiny-model"):
        load_tiny_model(path=tmp_path)
