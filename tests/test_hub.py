"""Sharing on the Hub, offline: upload plans, pushes to a fake HfApi, pulls from a local Hub cache
through huggingface_hub in offline mode, and remote reads through fsspec's memory/local filesystems."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, ModelCard
from huggingface_hub.hf_api import RepoFile

import pipeline.loader
from pipeline.errors import PipelineError
from pipeline.hub import (
    HubUploader, PushConfig, hub_repo_of, open_remote_cache, parse_shards, plan_cache_push, pull_cache, push,
    push_cache, push_saes,
)
from pipeline.loader import ActivationLoader
from pipeline.manifest import read_manifest
from pipeline.reader import Cache
from pipeline.verify import verify_cache
from pipeline.writer import CacheWriter, WriterConfig
from tests.synthetic import CONTEXT, HOOKS, step_blocks

TOKEN = "hf_" + "FakeTokenForTests" * 2  # shaped like a real one, so redaction by pattern is tested too
H0, H1 = list(HOOKS)
COMMAND = f"pipeline cache --model tiny --tokens 500 --token {TOKEN}"


# --------------------------------------------------------------------------------- helpers


def make_cache(path: Path, fmt: str = "zarr", steps: int = 8, writer=CacheWriter, **kwargs) -> dict:
    """A tiny cache with tokens, several shards per split, and a command that quotes the token."""
    w = writer(path, HOOKS, WriterConfig(format=fmt, shard_mb=0.002), has_tokens=True,
               provenance={"context_size": CONTEXT, "model": {"name": "tiny"}, "dataset": {"name": "stdlib"},
                           "command": COMMAND}, **kwargs)
    for step in range(steps):
        w.put(step_blocks(step))
    return w.close(complete=True)


class FakeHfApi:
    """The few HfApi methods a push uses, over in-memory repos; checks the manifest-last invariant."""

    def __init__(self, fail_after: int | None = None):
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.tokens: set = set()
        self.fail_after = fail_after

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, token=None):
        self.tokens.add(token)
        self.repos.setdefault((repo_type or "model", repo_id), {})

    def create_branch(self, repo_id, branch, repo_type=None, exist_ok=False, token=None):
        pass

    def list_repo_tree(self, repo_id, recursive=False, repo_type=None, revision=None, token=None, expand=False):
        for path, data in sorted(self.repos[(repo_type or "model", repo_id)].items()):
            lfs = ({"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
                   if len(data) > 1000 else None)  # big files as LFS, small ones in git: both comparisons run
            oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            yield RepoFile(path=path, size=len(data), oid=oid, lfs=lfs)

    def hf_hub_download(self, repo_id, filename, repo_type=None, revision=None, token=None):
        import tempfile

        out = Path(tempfile.mkdtemp()) / Path(filename).name
        out.write_bytes(self.repos[(repo_type or "model", repo_id)][filename])
        return str(out)

    def create_commit(self, repo_id, operations, commit_message, repo_type=None, revision=None, token=None):
        if self.fail_after is not None and len(self.commits) >= self.fail_after:
            raise ConnectionError("network went away")
        self.tokens.add(token)
        files = self.repos[(repo_type or "model", repo_id)]
        added = {}
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                added[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
            elif isinstance(op, CommitOperationDelete):
                files.pop(op.path_in_repo)
        files.update(added)
        self.commits.append({"message": commit_message, "paths": list(added), "repo": repo_id,
                             "bytes": sum(map(len, added.values()))})
        if "manifest.json" in files and repo_type == "dataset":  # never a manifest listing what is not there
            m = json.loads(files["manifest.json"])
            for info in m["splits"].values():
                for shard in info["shards"]:
                    for rel, meta in shard["files"].items():
                        assert len(files[rel]) == meta["bytes"], rel

    def materialize(self, hub_cache: Path, repo_id: str, repo_type: str = "dataset") -> Path:
        """The repo as huggingface_hub's cache layout: <type>s--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
        files = self.repos[(repo_type, repo_id)]
        commit = hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in files.items()))
                              .encode()).hexdigest()
        root = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
        for path, data in files.items():
            f = root / "snapshots" / commit / path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        return root / "snapshots" / commit


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Zarr and Arrow caches pushed to a fake Hub and laid out as a local Hub cache."""
    root = tmp_path_factory.mktemp("hub")
    api, out = FakeHfApi(), {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", TOKEN)
        for fmt in ("zarr", "arrow"):
            make_cache(root / fmt, fmt)
            push_cache(root / fmt, f"org/{fmt}", api=api, log=None)
            api.materialize(root / "hub_cache", f"org/{fmt}")
    out["api"], out["root"], out["hub_cache"] = api, root, root / "hub_cache"
    return out


def listed_files(manifest: dict) -> set[str]:
    return {rel for info in manifest["splits"].values() for sh in info["shards"] for rel in sh["files"]}


# --------------------------------------------------------------------------------- plans and cards


def test_upload_plan_groups_commits_and_sends_the_manifest_last(tmp_path):
    m = make_cache(tmp_path / "c")
    shard_bytes = max(sum(f["bytes"] for f in sh["files"].values()) for sh in m["splits"]["train"]["shards"])
    plan = plan_cache_push(tmp_path / "c", "org/c", {}, config=PushConfig(max_commit_files=10 ** 6,
                                                                         max_commit_bytes=2 * shard_bytes))
    paths = [f.path_in_repo for f in plan.files]
    assert set(paths) == listed_files(m) | {"README.md", "manifest.json"} and len(paths) == len(set(paths))
    assert plan.commits[-1].files[-1].path_in_repo == "manifest.json"
    assert all("manifest.json" not in [f.path_in_repo for f in c.files] for c in plan.commits[:-1])
    assert len(plan.commits) > 3
    for c in plan.commits[:-1]:
        assert c.bytes <= 2 * shard_bytes
        shards = {f.shard for f in c.files}
        for shard in shards:  # a shard's files are never split across commits when it fits in one
            split, name = shard.split("/")
            entry = next(s for s in m["splits"][split]["shards"] if s["name"] == name)
            assert set(entry["files"]) <= {f.path_in_repo for f in c.files}
    by_files = plan_cache_push(tmp_path / "c", "org/c", {}, config=PushConfig(max_commit_files=5))
    assert all(len(c.files) <= 5 for c in by_files.commits[:-1])  # a zarr shard's 8 files > 5: split up
    card = DatasetCard(plan.card)
    meta = card.data.to_dict()["activation_cache"]
    assert meta["hooks"] == HOOKS and meta["dtype"] == "float32" and meta["backend"] == "zarr"
    assert meta["tokens"] == {s: m["splits"][s]["rows"] for s in ("train", "eval")} and meta["model"] == "tiny"
    assert meta["command"].startswith("pipeline cache --model tiny") and TOKEN not in plan.card
    assert card.data.to_dict()["viewer"] is False and "pipeline pull org/c" in card.text


def test_arrow_card_configs_load_with_datasets(tmp_path):
    import datasets

    m = make_cache(tmp_path / "c", "arrow")
    plan = plan_cache_push(tmp_path / "c", "org/c", {})
    configs = DatasetCard(plan.card).data.to_dict()["configs"]
    assert [c["config_name"] for c in configs] == list(HOOKS)
    (tmp_path / "c" / "README.md").write_text(plan.card)  # a local folder with this card reads like the repo
    ds = datasets.load_dataset(str(tmp_path / "c"), H1, split="eval", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == m["splits"]["eval"]["rows"] and len(ds[0][H1]) == HOOKS[H1]
    got = np.asarray(ds.with_format("numpy")[:][H1])
    np.testing.assert_array_equal(got, Cache(tmp_path / "c").read_split(H1, "eval"))


def test_parse_shards():
    assert parse_shards("0:10") == slice(0, 10) and parse_shards("3") == slice(3, 4)
    assert parse_shards(None) == slice(None) and parse_shards(":5") == slice(None, 5)
    with pytest.raises(PipelineError, match="START:STOP"):
        parse_shards("a:b")
    assert hub_repo_of("hf://datasets/org/name") == "org/name" and hub_repo_of("caches/x") is None


# --------------------------------------------------------------------------------- pushing


def test_push_resumes_skips_uploaded_files_and_never_leaks_the_token(tmp_path, token):
    make_cache(tmp_path / "c")
    cfg = PushConfig(max_commit_files=8)
    api = FakeHfApi(fail_after=2)
    with pytest.raises(ConnectionError):
        push_cache(tmp_path / "c", "org/c", api=api, config=cfg, log=None)
    first = {p for c in api.commits for p in c["paths"]}
    assert "manifest.json" not in api.repos[("dataset", "org/c")]  # an interrupted push never looks complete
    api.fail_after = None
    plan = push_cache(tmp_path / "c", "org/c", api=api, config=cfg, log=None)
    assert first <= set(plan.skipped) and not first & {f.path_in_repo for f in plan.files}
    remote = api.repos[("dataset", "org/c")]
    assert set(remote) == listed_files(read_manifest(tmp_path / "c")) | {"README.md", "manifest.json"}
    assert push_cache(tmp_path / "c", "org/c", api=api, log=None).commits == []  # up to date: nothing sent
    assert api.tokens == {TOKEN}  # handed to the API ...
    for data in remote.values():  # ... and never written anywhere
        assert TOKEN.encode() not in data
    assert all(TOKEN not in c["message"] for c in api.commits)
    assert "<redacted>" in json.loads(remote["manifest.json"])["provenance"]["command"]


def test_push_needs_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    make_cache(tmp_path / "c", steps=2)
    with pytest.raises(PipelineError, match=r"hf auth login.*huggingface-cli login.*HF_TOKEN"):
        push_cache(tmp_path / "c", "org/c", api=FakeHfApi(), log=None)


def test_push_refuses_a_repo_with_other_content(tmp_path, token):
    make_cache(tmp_path / "c", steps=2)
    api = FakeHfApi()
    api.repos[("dataset", "org/data")] = {"data/train.parquet": b"x", "README.md": b"hi"}
    with pytest.raises(PipelineError, match="not part of an activation cache.*data/train.parquet"):
        push_cache(tmp_path / "c", "org/data", api=api, log=None)
    api.repos[("dataset", "org/other")] = {"manifest.json": b'{"format": "something-else"}'}
    with pytest.raises(PipelineError, match="not an activation cache"):
        push_cache(tmp_path / "c", "org/other", api=api, log=None)
    make_cache(tmp_path / "d", steps=2, source_config={"model": "another"})
    push_cache(tmp_path / "d", "org/d", api=api, log=None)
    with pytest.raises(PipelineError, match="different cache.*--overwrite"):
        push_cache(tmp_path / "c", "org/d", api=api, log=None)
    push_cache(tmp_path / "c", "org/d", api=api, config=PushConfig(overwrite=True), log=None)
    want = listed_files(read_manifest(tmp_path / "c")) | {"README.md", "manifest.json"}
    assert set(api.repos[("dataset", "org/d")]) == want  # the other cache's stale shards were deleted
    api.repos[("model", "org/saes")] = {"manifest.json": b"{}", "hooks/x/train/shard-00000": b""}
    with pytest.raises(PipelineError, match="not SAEs"):
        push_saes(sae_exports(tmp_path / "runs"), "org/saes", api=api, log=None)


def sae_exports(path: Path) -> Path:
    from trainer.export import export_saelens
    from trainer.sae_topk import TopKConfig, TopKSAE

    model = TopKSAE([TopKConfig(d_in=16, d_sae=32, k=4, seed=s) for s in range(2)])
    for run in range(2):
        export_saelens(model, run, path / f"topk-d32-k4-{run}", {"hook_name": H0, "model_name": "tiny", "l0": 4.0,
                                                                 "training_config": {"note": TOKEN}},
                       sparsity=torch.full((32,), -2.0))
    return path


def test_push_saes_in_saelens_hub_layout(tmp_path, token, offline, monkeypatch):
    runs = sae_exports(tmp_path / "runs")
    api = FakeHfApi()
    plan = push(runs, "org/saes", api=api, log=None)  # a folder of exports: detected as SAEs
    remote = api.repos[("model", "org/saes")]
    assert set(remote) == {f"topk-d32-k4-{r}/{n}" for r in range(2)
                           for n in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")} | {"README.md"}
    assert plan.commits[-1].files[-1].path_in_repo == "README.md"
    card = ModelCard(remote["README.md"].decode())
    assert card.data.library_name == "saelens"
    assert set(card.data.to_dict()["saes"]) == {"topk-d32-k4-0", "topk-d32-k4-1"}
    assert all(TOKEN.encode() not in d for d in remote.values())
    assert push_saes(runs / "topk-d32-k4-1", "org/saes", api=api, log=None).commits == []  # one export, unchanged
    sae_lens = pytest.importorskip("sae_lens")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    api.materialize(tmp_path / "hub_cache", "org/saes", "model")
    sae = sae_lens.SAE.from_pretrained("org/saes", "topk-d32-k4-1", device="cpu")  # release = the repo id
    local = sae_lens.SAE.load_from_disk(str(runs / "topk-d32-k4-1"), device="cpu")
    torch.testing.assert_close(sae.W_dec, local.W_dec)


# --------------------------------------------------------------------------------- pulling


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_pull_whole_and_part_offline(tmp_path, pushed, offline, fmt):
    src = pushed["root"] / fmt
    full = pull_cache(f"org/{fmt}", tmp_path / "full", hub_cache_dir=pushed["hub_cache"], log=None)
    problems, m = verify_cache(full)
    assert problems == [] and "partial" not in m
    source = read_manifest(src)
    assert m["splits"] == source["splits"] and m["hooks"] == source["hooks"]
    np.testing.assert_array_equal(Cache(full).read_split(H1, "eval"), Cache(src).read_split(H1, "eval"))

    part = pull_cache(f"org/{fmt}", tmp_path / "part", hooks=[H0], split="train", shards="1:3",
                      hub_cache_dir=pushed["hub_cache"], log=None)
    problems, m = verify_cache(part)
    assert problems == [] and m["partial"]["hooks"] == [H0] and m["partial"]["shards"] == "1:3"
    assert list(m["hooks"]) == [H0] and m["splits"]["eval"]["shards"] == []
    assert [s["name"] for s in m["splits"]["train"]["shards"]] == ["shard-00001", "shard-00002"]
    assert not (part / "hooks" / H1).exists() and not (part / "hooks" / H0 / "eval").exists()
    with pytest.raises(PipelineError, match="partial pull of org/"):  # extending it would mix in holes
        make_cache(part, fmt, resume=True)
    mine, theirs = Cache(part), Cache(src)
    for i, shard in enumerate(m["splits"]["train"]["shards"]):
        np.testing.assert_array_equal(mine.activations(H0, "train", i), theirs.activations(H0, "train", i + 1))
        tokens, seqs = mine.tokens("train", i), mine.sequences("train", i)
        local_seq = tokens[:, 1] - shard["sequence_offset"]  # rows index the full split's sequences
        np.testing.assert_array_equal(seqs[local_seq, tokens[:, 2]], tokens[:, 0])
    loader = ActivationLoader(part, batch_size=16, seed=1)
    rows = torch.cat(list(loader))
    assert rows.shape == (m["splits"]["train"]["rows"], HOOKS[H0])
    want = torch.cat([torch.from_numpy(np.asarray(theirs.activations(H0, "train", i))) for i in (1, 2)])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, want.tolist()))
    if fmt == "arrow":
        import datasets

        ds = datasets.load_from_disk(str(part / "hooks" / H0 / "train"))
        assert ds.num_rows == m["splits"]["train"]["rows"]


def test_pull_errors(tmp_path, pushed, offline):
    with pytest.raises(PipelineError, match=f"no hook 'nope'; it has: {H0}, {H1}"):
        pull_cache("org/zarr", tmp_path / "x", hooks=["nope"], hub_cache_dir=pushed["hub_cache"], log=None)
    with pytest.raises(PipelineError, match="not in the local Hub cache"):
        pull_cache("org/missing", tmp_path / "x", hub_cache_dir=pushed["hub_cache"], log=None)
    pull_cache("org/zarr", tmp_path / "z", shards="0", hub_cache_dir=pushed["hub_cache"], log=None)
    with pytest.raises(PipelineError, match="another cache"):
        pull_cache("org/arrow", tmp_path / "z", hub_cache_dir=pushed["hub_cache"], log=None)


def test_pull_checksum_mismatch_names_the_shard_and_keeps_the_good_ones(tmp_path, pushed, offline, monkeypatch):
    hub_cache = tmp_path / "hub_cache"
    snapshot = pushed["api"].materialize(hub_cache, "org/zarr")
    m = read_manifest(snapshot)
    bad = next(rel for rel in m["splits"]["train"]["shards"][1]["files"] if rel.endswith("c/0/0") and H0 in rel)
    good = (snapshot / bad).read_bytes()
    corrupt = bytearray(good)
    corrupt[3] ^= 0xFF
    (snapshot / bad).write_bytes(bytes(corrupt))
    with pytest.raises(PipelineError, match=r"train/shard-00001 .*checksum mismatch.*good shards are in"):
        pull_cache("org/zarr", tmp_path / "out", split="train", hub_cache_dir=hub_cache, log=None)
    problems, kept = verify_cache(tmp_path / "out")
    names = [s["name"] for s in kept["splits"]["train"]["shards"]]
    assert problems == [] and "shard-00001" not in names and len(names) == len(m["splits"]["train"]["shards"]) - 1

    real, calls = huggingface_hub.hf_hub_download, []

    def refetch(*args, force_download=False, **kwargs):  # the Hub serves the right bytes on a fresh download
        calls.append(force_download)
        if force_download:
            (snapshot / bad).write_bytes(good)
        return real(*args, **kwargs)

    (snapshot / bad).write_bytes(bytes(corrupt))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refetch)
    pull_cache("org/zarr", tmp_path / "out", split="train", hub_cache_dir=hub_cache, log=None)  # resumes
    assert calls.count(True) == 1 and verify_cache(tmp_path / "out")[0] == []
    assert len(read_manifest(tmp_path / "out")["splits"]["train"]["shards"]) == len(m["splits"]["train"]["shards"])


# --------------------------------------------------------------------------------- streaming and the writer


def test_remote_cache_through_fsspec_memory_and_local(tmp_path, monkeypatch):
    make_cache(tmp_path / "c")
    mem = fsspec.filesystem("memory")
    mem.put(str(tmp_path / "c"), "/caches/c", recursive=True)
    try:
        rc = open_remote_cache("memory://caches/c", fs=mem, cache_dir=tmp_path / "mirror")
        assert [p.name for p in (tmp_path / "mirror").iterdir()] == ["manifest.json"]  # nothing fetched yet
        np.testing.assert_array_equal(rc.activations(H1, "eval", 1), Cache(tmp_path / "c").activations(H1, "eval", 1))
        mirror = tmp_path / "mirror"
        fetched = {p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file()}
        assert {f for f in fetched if f != "manifest.json"} == {
            rel for rel in rc.shards("eval")[1]["files"] if rel.startswith(f"hooks/{H1}/eval/")}

        def open_source(path):  # the hook proposed for pipeline.loader.open_source
            from pipeline.hub import is_remote

            return open_remote_cache(path, fs=mem, cache_dir=tmp_path / "mirror") if is_remote(path) else real(path)

        real = pipeline.loader.open_source
        monkeypatch.setattr(pipeline.loader, "open_source", open_source)
        rows = torch.cat(list(ActivationLoader("memory://caches/c", hooks=H0, batch_size=32)))
        assert rows.shape[0] == rc.rows("train")
        assert not (tmp_path / "mirror" / "tokens").exists()  # only what the loader read was fetched

        other = mem.cat_file(f"/caches/c/{next(iter(rc.shards('train')[0]['files']))}")
        target = next(r for r in rc.shards("train")[2]["files"] if r.startswith("tokens/train/rows/") and "/c/" in r)
        mem.pipe_file(f"/caches/c/{target}", other[::-1])
        with pytest.raises(PipelineError, match="train/shard-00002 .*checksum after two downloads"):
            open_remote_cache("memory://caches/c", fs=mem, cache_dir=tmp_path / "mirror2").tokens("train", 2)
    finally:
        mem.rm("/caches", recursive=True)
    local = open_remote_cache(str(tmp_path / "c"), fs=fsspec.filesystem("file"), cache_dir=tmp_path / "mirror3")
    np.testing.assert_array_equal(local.read_split(H0), Cache(tmp_path / "c").read_split(H0))
    with pytest.raises(PipelineError, match="not an activation cache"):
        open_remote_cache(str(tmp_path), fs=fsspec.filesystem("file"), cache_dir=tmp_path / "mirror4")


class UploadingWriter(CacheWriter):
    """The writer with the proposed hook: `on_commit(manifest)` after each manifest write."""

    uploader: HubUploader

    def _make_durable(self, *args):
        super()._make_durable(*args)
        self.uploader.on_commit(self.manifest)

    def close(self, complete: bool = True) -> dict:
        manifest = super().close(complete)
        self.uploader.on_commit(manifest)  # the final write (complete=True) happens inside close
        self.uploader.close()
        return manifest


def test_hub_uploader_while_writing(tmp_path, token, offline):
    api = FakeHfApi()
    UploadingWriter.uploader = HubUploader(tmp_path / "c", "org/live", api=api)
    m = make_cache(tmp_path / "c", "arrow", writer=UploadingWriter)
    assert len(api.commits) >= 2  # uploaded as it went, the manifest with each (checked by the fake)
    sent = [p for c in api.commits for p in c["paths"] if p.endswith((".arrow", "dataset_info.json"))]
    assert len(sent) == len(set(sent))  # every shard file sent once (state.json follows the shard list)
    api.materialize(tmp_path / "hub_cache", "org/live")
    out = pull_cache("org/live", tmp_path / "pulled", hub_cache_dir=tmp_path / "hub_cache", log=None)
    problems, pulled = verify_cache(out)
    assert problems == [] and pulled["complete"] and pulled["splits"] == m["splits"]


def test_a_refused_commit_is_one_line_without_the_token(tmp_path, token):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    class Refusing(FakeHfApi):
        def create_commit(self, repo_id, *args, **kwargs):
            response = httpx2.Response(403, request=httpx2.Request("POST", f"https://huggingface.co/api/{repo_id}"))
            raise HfHubHTTPError(f"403 Forbidden: you may not write (token {TOKEN})", response=response)

    make_cache(tmp_path / "c", steps=2)
    with pytest.raises(PipelineError, match="refused the push to org/c after 0 of .*403 Forbidden") as e:
        push_cache(tmp_path / "c", "org/c", api=Refusing(), log=None)
    assert TOKEN not in str(e.value) and "\n" not in str(e.value)


def test_cache_to_the_hub_needs_a_token_before_running_the_model(tmp_path, monkeypatch):
    """`pipeline cache --out hf://datasets/ORG/NAME` stages locally and uploads as it commits; without
    a token it stops before loading the model, saying how to log in."""
    from cache_writer.run import CacheConfig, run_cache

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setenv("SAE_PIPELINE_HUB_STAGING", str(tmp_path / "staging"))
    with pytest.raises(PipelineError, match=r"hf auth login"):
        run_cache(CacheConfig(model="tiny", out="hf://datasets/org/acts", tokens=2000), progress=False)
    assert not (tmp_path / "staging" / "org--acts" / "manifest.json").exists()
