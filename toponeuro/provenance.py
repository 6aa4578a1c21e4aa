"""Where a result came from: the git commit of the code and whether its tree was edited.

Benchmarks and experiment runs record these beside their figures, so a
number can be traced to the code that produced it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["git_commit", "git_dirty", "git_tracked"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def _environment_commit() -> str:
    return os.environ.get("TOPONEURO_COMMIT", "").strip()


def _git(args: list[str], cwd: Path) -> str | None:
    """stdout of ``git ARGS`` run in ``cwd``, or None if git is missing or fails."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the package's repository, or ``"unknown"``.

    ``TOPONEURO_COMMIT`` in the environment takes precedence: a copy of the
    tree without ``.git`` (as on a rented GPU machine) can still record the
    commit it was copied from.
    """
    if _environment_commit():
        return _environment_commit()
    out = _git(["rev-parse", "--short", "HEAD"], _PACKAGE_DIR)
    return out.strip() if out and out.strip() else "unknown"


def git_dirty(path: Path | str | None = None) -> bool | None:
    """Whether the git working tree holding ``path`` (default: this package) has uncommitted changes.

    ``git status --porcelain --untracked-files=no`` is non-empty: a tracked
    file modified, staged, deleted or renamed. Untracked files are ignored
    (benchmark outputs and scratch files would otherwise mark every rerun).
    None when unknown: ``TOPONEURO_COMMIT`` is set (the commit then comes from
    the environment, see :func:`git_commit`, and this tree's state says
    nothing about it), git is missing, or ``path`` is not in a repository.
    """
    if _environment_commit():
        return None
    out = _git(["status", "--porcelain", "--untracked-files=no"], _PACKAGE_DIR if path is None else Path(path))
    return None if out is None else bool(out.strip())


def git_tracked(path: Path | str) -> bool:
    """Whether the file ``path`` is tracked by the git repository that holds it (False when git is
    missing, the file is untracked, or it is not in a repository)."""
    path = Path(path).resolve()
    return _git(["ls-files", "--error-unmatch", "--", path.name], path.parent) is not None
