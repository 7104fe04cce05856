"""A hook's running statistics (row count, sum, sums of norms and squared norms), accumulated per
block in float64 and merged shard by shard into the manifest."""

from __future__ import annotations

import numpy as np

from pipeline.manifest import empty_stats


def new_block_stats(d: int) -> dict:
    return {"count": 0, "sum": np.zeros(d, np.float64), "sum_norm": 0.0, "sum_sq_norm": 0.0}



def accumulate_stats(st: dict, x: np.ndarray, sq: np.ndarray | None = None) -> None:
    """Add a (rows, d) float32 block (and its rows' squared norms) to running float64 totals."""
    # Per-block sums in float32 are exact enough (pairwise summation); the totals are float64.
    sq = np.einsum("ij,ij->i", x, x) if sq is None else sq
    st["count"] += x.shape[0]
    st["sum"] += x.sum(0)
    st["sum_norm"] += float(np.sqrt(sq).sum(dtype=np.float64))
    st["sum_sq_norm"] += float(sq.sum(dtype=np.float64))



def merge_stats(total: dict, part: dict, sign: int) -> None:
    """Add (or subtract) a shard's statistics to the hook's running totals, and refresh the means."""
    if total.get("sum") is None or len(total["sum"]) != len(part["sum"]):
        total.update(empty_stats(len(part["sum"])))
    total["count"] += sign * part["count"]
    total["sum_norm"] += sign * part["sum_norm"]
    total["sum_sq_norm"] += sign * part["sum_sq_norm"]
    total["sum"] = (np.asarray(total["sum"], np.float64) + sign * np.asarray(part["sum"])).tolist()
    n = total["count"]
    total["mean_norm"] = total["sum_norm"] / n if n else None
    total["mean"] = (np.asarray(total["sum"]) / n).tolist() if n else None
