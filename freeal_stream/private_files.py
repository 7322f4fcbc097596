"""A job's state is private to the user running it: its folders 0700, its DuckDB file 0600.

Texts, labels, LLM answers and model weights are the user's data; nobody else on the machine may read them.
Every folder the job creates (the state folder, models/, embeddings/ and any missing parent) is made 0700,
so the files inside need nothing more. A state folder that already existed is tightened when it is empty
or already a state folder; one holding other files keeps its mode (they are the user's), and then the job's
own files are still private (DuckDB's write-ahead log aside, while it exists). Exports are the user's to
place and follow the umask, like any other command's output.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path, *, tighten: bool = False) -> Path:
    """Create `path` and its missing parents as 0700 folders; with `tighten`, make an existing `path` 0700."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        _chmod(p, PRIVATE_DIR)
    if tighten and path not in missing:
        _chmod(path, PRIVATE_DIR)
    return path


def private_file(path: Path) -> None:
    """Make an existing file readable and writable by its owner only."""
    _chmod(path, PRIVATE_FILE)


def _chmod(path: Path, mode: int) -> None:
    """chmod, for what this user owns (another user's folder is left as it is: its owner decides)."""
    try:
        if path.stat().st_uid == os.getuid():
            os.chmod(path, mode)
    except FileNotFoundError:
        pass
