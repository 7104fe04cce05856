"""safetensors files written with the mode any new file gets (0644 under the usual umask).

safetensors writes through a temporary file that it renames into place, and such temporary files
are created 0600: an export or a checkpoint would be unreadable to colleagues on a shared
filesystem, unlike every other file the project writes (plain `open`, which honours the umask).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def new_file_mode() -> int:
    """0o666 less the process's umask: the mode `open(path, "w")` gives a new file."""
    try:  # Linux says the umask without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, then the mode a new file gets under the umask."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, new_file_mode())


def size(n: int) -> str:
    """Bytes for a person: GiB or MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
