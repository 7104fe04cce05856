"""What pushing and pulling share: the token, redaction, the remote file list, content comparison.

The token comes from huggingface_hub (HF_TOKEN or the login's stored token) and is only ever
handed to huggingface_hub calls: nothing here writes it into a file, a card or a message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

CACHE_REPO_TYPE = "dataset"
SAE_REPO_TYPE = "model"
CARD_FILE = "README.md"
# Files the Hub itself creates in a new repo: never a sign of foreign content.
HUB_FILES = (".gitattributes",)
# Hugging Face user access tokens; redacted wherever a text we upload might quote one.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "<redacted>"
LOGIN_HINT = "run `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"


def resolve_token(token: str | None = None, *, action: str = "push to the Hub") -> str:
    """The token for a write: the argument, else HF_TOKEN, else the stored login."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PipelineError(f"no Hugging Face token: to {action}, {LOGIN_HINT}")
    return found


def optional_token(token: str | None = None) -> str | None:
    """The token for a read, if there is one (public repos need none)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def redact(text: str, token: str | None = None) -> str:
    """`text` without the given token or anything shaped like a Hugging Face token."""
    if token:
        text = text.replace(token, REDACTED)
    return TOKEN_PATTERN.sub(REDACTED, text)


@dataclass(frozen=True)
class RemoteFile:
    """A file of a Hub repo as its tree listing describes it."""

    path: str
    """Path inside the repo."""
    size: int
    """Bytes."""
    sha256: str | None
    """sha256 of the content for LFS/Xet files (None for files stored in git)."""
    blob_id: str
    """git blob id (sha1 of 'blob <size>\\0' + content for files stored in git)."""


def list_remote(api, repo_id: str, repo_type: str, revision: str | None, token: str | None) -> dict[str, RemoteFile]:
    """Every file of a repo at `revision` (empty when the repo or the branch does not exist yet)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        tree = api.list_repo_tree(repo_id, recursive=True, repo_type=repo_type, revision=revision, token=token)
        files = {}
        for entry in tree:
            if not hasattr(entry, "size"):  # a folder
                continue
            lfs = getattr(entry, "lfs", None)
            files[entry.path] = RemoteFile(entry.path, int(entry.size), lfs.sha256 if lfs else None, entry.blob_id)
        return files
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_of(local: Path | bytes) -> str:
    if isinstance(local, bytes):
        return hashlib.sha256(local).hexdigest()
    h = hashlib.sha256()
    with open(local, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def same_content(remote: RemoteFile | None, local: Path | bytes, size: int) -> bool:
    """Whether the Hub already holds exactly these bytes (hashed only when the sizes agree)."""
    if remote is None or remote.size != size:
        return False
    if remote.sha256:
        return remote.sha256 == sha256_of(local)
    data = local if isinstance(local, bytes) else Path(local).read_bytes()  # git-stored files are small
    return remote.blob_id == git_blob_id(data)


def parse_shards(spec: str | None) -> slice:
    """'3' (one shard), '0:10', ':5' or '10:' as a slice over a split's shards."""
    if spec is None or spec == "":
        return slice(None)
    try:
        if ":" not in spec:
            i = int(spec)
            return slice(i, i + 1)
        start, stop = spec.split(":")
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise PipelineError(f"bad shard range {spec!r}; use START:STOP (e.g. 0:10), :STOP, START: or one "
                            "index") from None


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def check_reachable(action: str) -> None:
    """Refuse at once when the Hub's host cannot be reached at all (no network, no DNS): huggingface_hub
    would retry with backoff for half a minute, then end in a traceback or a long message. Offline
    mode and proxies (which a direct connection says nothing about) are left to huggingface_hub."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
    except OSError as e:
        raise PipelineError(f"cannot reach the Hub at {constants.ENDPOINT} to {action} ({e.strerror or e}); "
                            "check the network (or HF_ENDPOINT) and rerun") from None


def is_network_error(e: BaseException) -> bool:
    """A connection that failed or broke (DNS, refused, reset, timed out), whichever HTTP client
    huggingface_hub uses (httpx's TransportError, requests' ConnectionError)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ in ("TransportError", "ConnectionError", "Timeout") for c in type(e).__mro__)
