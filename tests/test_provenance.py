"""Tests for toponeuro.provenance: the commit and dirty flag recorded beside results, against git itself."""

import shutil
import subprocess
from pathlib import Path

import pytest

from toponeuro import provenance


def test_git_commit_from_the_repository_or_the_environment(monkeypatch):

    monkeypatch.delenv("TOPONEURO_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(provenance.__file__).parent,
                          capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert provenance.git_commit() == (expected or "unknown")
    monkeypatch.setenv("TOPONEURO_COMMIT", " abc1234 ")  # a tree copied without .git
    assert provenance.git_commit() == "abc1234"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_dirty_against_git_status(tmp_path, monkeypatch):
    monkeypatch.delenv("TOPONEURO_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path counts
    repo = tmp_path / "repo"
    repo.mkdir()
    assert provenance.git_dirty(repo) is None  # not a repository

    def git(*argv):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *argv], cwd=repo,
                       check=True, capture_output=True)

    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "a")
    assert provenance.git_dirty(repo) is False
    (repo / "untracked.txt").write_text("results\n")
    assert provenance.git_dirty(repo) is False  # untracked files are ignored
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.git_dirty(repo) is True  # a modified tracked file
    git("add", "a.py")
    assert provenance.git_dirty(repo) is True  # staged, not committed
    git("commit", "-q", "-m", "b")
    assert provenance.git_dirty(repo) is False
    monkeypatch.setenv("TOPONEURO_COMMIT", "abc1234")  # a copied tree: its state is unknown
    assert provenance.git_dirty(repo) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_tracked_against_git_ls_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path counts
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "results.json").write_text("{}\n")
    assert provenance.git_tracked(repo / "data" / "results.json") is False  # not a repository

    def git(*argv):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *argv], cwd=repo,
                       check=True, capture_output=True)

    git("init", "-q")
    assert provenance.git_tracked(repo / "data" / "results.json") is False  # untracked
    git("add", "data/results.json")
    assert provenance.git_tracked(repo / "data" / "results.json") is True  # staged counts: git knows it
    git("commit", "-q", "-m", "results")
    (repo / "data" / "other.json").write_text("{}\n")
    assert provenance.git_tracked(repo / "data" / "results.json") is True
    assert provenance.git_tracked(repo / "data" / "other.json") is False
    assert provenance.git_tracked(repo / "data" / "missing.json") is False
