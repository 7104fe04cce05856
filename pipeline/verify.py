"""`pipeline verify` and `pipeline info`: check every shard against the manifest; show a cache."""

from __future__ import annotations

from pathlib import Path

from pipeline.manifest import read_manifest
from pipeline.writer import file_checksum


def verify_cache(path: str | Path) -> tuple[list[str], dict]:
    """Check every claimed file's size and xxh3 checksum. Returns (problems, manifest)."""
    path = Path(path)
    manifest = read_manifest(path)
    problems = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            for rel, expect in shard["files"].items():
                f = path / rel
                label = f"{split}/{shard['name']} ({rel})"
                if not f.is_file():
                    problems.append(f"shard {label}: file is missing")
                elif f.stat().st_size != expect["bytes"]:
                    problems.append(f"shard {label}: {f.stat().st_size} bytes, expected {expect['bytes']} (truncated?)")
                elif file_checksum(f) != expect["xxh3_64"]:
                    problems.append(f"shard {label}: checksum mismatch (corrupt)")
        if sum(s["rows"] for s in info["shards"]) != info["rows"]:
            problems.append(f"split {split}: shard rows do not add up to the manifest's {info['rows']}")
    return problems, manifest


def render_info(path: str | Path) -> None:
    """Print a cache's manifest as readable tables."""
    from rich.console import Console
    from rich.table import Table

    manifest = read_manifest(path)
    console = Console()
    prov = manifest["provenance"]
    head = Table(title=f"cache {path}", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("format", f"{manifest['format']} v{manifest['format_version']} ({manifest['backend']}"
                   f"{', ' + manifest['compression'] if manifest['compression'] else ''})"),
        ("complete", str(manifest["complete"])),
        ("dtype", manifest["dtype"]),
        ("model", str((prov.get("model") or {}).get("name"))),
        ("dataset", str((prov.get("dataset") or {}).get("name"))),
        ("context size", str(manifest.get("context_size"))),
        ("created", manifest["created"]),
        ("package version", manifest["package_version"]),
        ("command", str(prov.get("command"))),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    hooks = Table(title="hooks")
    for col in ("hook", "d", "dtype", "mean norm", "train rows"):
        hooks.add_column(col)
    for name, h in manifest["hooks"].items():
        mn = h["stats"]["mean_norm"]
        hooks.add_row(name, str(h["shape"][0]), h["dtype"], "-" if mn is None else f"{mn:.4g}", str(h["stats"]["count"]))
    console.print(hooks)
    splits = Table(title="splits")
    for col in ("split", "rows", "sequences", "shards", "bytes"):
        splits.add_column(col)
    for split, info in manifest["splits"].items():
        size = sum(f["bytes"] for s in info["shards"] for f in s["files"].values())
        splits.add_row(split, f"{info['rows']:,}", f"{info['sequences']:,}", str(len(info["shards"])), f"{size:,}")
    console.print(splits)
