"""The README.md cards of Hub repos: YAML front matter the Hub indexes, then how to use the repo.

Cards are generated from the manifest / the SAEs' cfg.json only (no clock, no environment), so the
same content gives the same card and a re-push skips it.
"""

from __future__ import annotations

import json

import yaml

from pipeline.hub.common import redact
from pipeline.manifest import SPLITS, manifest_hash

CACHE_TAGS = ["sae-activation-cache", "activations", "sparse-autoencoders", "interpretability"]
SAE_TAGS = ["sae_lens", "sparse-autoencoder", "interpretability"]


def _front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def cache_metadata(manifest: dict) -> dict:
    """What a cache repo's card says about it in YAML: model, hooks, tokens, dtype, format, command."""
    prov = manifest.get("provenance") or {}
    splits = manifest["splits"]
    return {
        "format": manifest["format"],
        "format_version": manifest["format_version"],
        "backend": manifest["backend"],
        "compression": manifest["compression"],
        "dtype": manifest["dtype"],
        "complete": manifest["complete"],
        "model": (prov.get("model") or {}).get("name"),
        "dataset": (prov.get("dataset") or {}).get("name"),
        "context_size": manifest.get("context_size"),
        "hooks": {h: v["shape"][0] for h, v in manifest["hooks"].items()},
        "tokens": {s: splits[s]["rows"] for s in SPLITS},
        "sequences": {s: splits[s]["sequences"] for s in SPLITS},
        "shards": {s: len(splits[s]["shards"]) for s in SPLITS},
        "bytes": sum(f["bytes"] for s in SPLITS for sh in splits[s]["shards"] for f in sh["files"].values()),
        "command": prov.get("command"),
        "config_hash": manifest["config_hash"],
        "manifest_hash": manifest_hash(manifest),
        "package_version": manifest["package_version"],
    }


def arrow_configs(manifest: dict) -> list[dict]:
    """One `datasets` config per hook (its train/eval shard files), so `load_dataset(repo, hook)` works."""
    configs = []
    for hook in manifest["hooks"]:
        files = [{"split": s, "path": f"hooks/{hook}/{s}/*.arrow"} for s in SPLITS if manifest["splits"][s]["shards"]]
        if files:
            configs.append({"config_name": hook, "data_files": files})
    return configs


def cache_card(manifest: dict, repo_id: str, token: str | None = None) -> str:
    """The dataset card of a cache repo."""
    meta = cache_metadata(manifest)
    front: dict = {"pretty_name": f"Activations of {meta['model'] or 'a model'} ({', '.join(meta['hooks'])})",
                   "tags": CACHE_TAGS}
    if manifest["backend"] == "arrow":
        front["configs"] = arrow_configs(manifest)
    else:
        front["viewer"] = False  # Zarr arrays: the dataset viewer cannot read them
    front["activation_cache"] = meta
    hook = next(iter(meta["hooks"]))
    lines = [
        f"# Activation cache: {meta['model'] or 'unnamed source'}",
        "",
        f"Activations of {len(meta['hooks'])} hook(s) written by `pipeline cache` (sae-cache-pipeline "
        f"{meta['package_version']}), {meta['backend']} backend, stored as {meta['dtype']}: "
        f"{meta['tokens']['train']:,} train and {meta['tokens']['eval']:,} eval token rows"
        f"{'' if meta['complete'] else ' (incomplete: the writer has not finished)'}.",
        "",
        "| hook | d |",
        "| --- | --- |",
        *[f"| `{h}` | {d} |" for h, d in meta["hooks"].items()],
        "",
        "The layout is documented in the package's `docs/FORMAT.md`; `manifest.json` lists every shard "
        "file with its size and xxh3-64 checksum.",
        "",
        "## Made with",
        "",
        "```bash",
        meta["command"] or "(no command recorded: written through the writer API)",
        "```",
        "",
        "## Load it",
        "",
        "```bash",
        f"pipeline pull {repo_id} --out caches/{repo_id.split('/')[-1]}             # everything",
        f"pipeline pull {repo_id} --out caches/part --hook {hook} --split train --shards 0:4   # a part",
        "```",
        "",
        "```python",
        "from pipeline.hub import pull_cache",
        "from pipeline.loader import ActivationLoader",
        "",
        f"path = pull_cache({repo_id!r}, 'caches/part', hooks=[{hook!r}], split='train', shards='0:4')",
        f"loader = ActivationLoader(path, hooks={hook!r}, batch_size=4096)",
        "```",
    ]
    if manifest["backend"] == "arrow":
        lines += [
            "",
            "Each hook is also a `datasets` config (one fixed-size-list column named by the hook):",
            "",
            "```python",
            "import datasets",
            f"ds = datasets.load_dataset({repo_id!r}, {hook!r}, split='train')",
            "```",
        ]
    if meta["dtype"] == "bfloat16":
        lines += ["", "bfloat16 values are stored as their uint16 bit patterns (see FORMAT.md, dtypes)."]
    return redact(_front_matter(front) + "\n" + "\n".join(lines) + "\n", token)


def sae_card(saes: dict[str, dict], repo_id: str, token: str | None = None) -> str:
    """The model card of an SAE repo; `saes` maps each SAE id (its folder) to its cfg.json."""
    rows, models, hooks = [], [], []
    for sae_id, cfg in saes.items():
        meta = cfg.get("metadata") or {}
        models.append(meta.get("model_name"))
        hooks.append(meta.get("hook_name"))
        l0 = meta.get("l0")
        rows.append(f"| `{sae_id}` | {cfg.get('architecture', '?')} | {meta.get('model_name') or '-'} | "
                    f"`{meta.get('hook_name') or '-'}` | {cfg.get('d_in')} | {cfg.get('d_sae')} | "
                    f"{'-' if l0 is None else f'{l0:.4g}'} |")
    front = {
        "library_name": "saelens",
        "tags": SAE_TAGS,
        "saes": {sae_id: {"architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
                          "model": (cfg.get("metadata") or {}).get("model_name"),
                          "hook": (cfg.get("metadata") or {}).get("hook_name")}
                 for sae_id, cfg in saes.items()},
    }
    first = next(iter(saes))
    lines = [
        f"# Sparse autoencoders{' for ' + str(models[0]) if len(set(models)) == 1 and models[0] else ''}",
        "",
        "Trained with sae-cache-pipeline (`pipeline train`), saved in SAELens's layout: one folder per SAE id "
        "holding `cfg.json`, `sae_weights.safetensors` and `sparsity.safetensors` (log10 feature densities).",
        "",
        "| SAE id | architecture | model | hook | d_in | d_sae | L0 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "## Load them",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f"sae = SAE.from_pretrained({repo_id!r}, {first!r})   # release = this repo, sae_id = the folder",
        "```",
        "",
        "or download a folder and continue training from it: "
        "`pipeline train --cache DIR --init-from <folder> ...`.",
        "",
        "Training provenance (cache manifest hash, full training config) is in each `cfg.json`'s `metadata`.",
    ]
    return redact(_front_matter(front) + "\n" + "\n".join(lines) + "\n", token)


def redacted_json(obj: dict, token: str | None = None) -> bytes:
    """A JSON file as uploaded: indented like the writer's, tokens removed."""
    return (redact(json.dumps(obj, indent=1), token) + "\n").encode()
