"""File sync for `ow exec` and `ow ssh`: which files of a directory go, and which came back.

What goes is what `.gitignore` keeps (asked of git itself when the directory is in a repository,
so its rules are exact), never `.git`, virtual environments or caches. Inside the job,
`python -m openweights.cluster._sync snapshot` records the files' hashes before the command and
`... collect` copies every file the command created or changed into `uploads/`, from where the
worker uploads it and `ow exec` writes it back.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["MANIFEST", "collect", "select_files", "snapshot"]

MANIFEST = ".ow-sync-manifest.json"
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".venv",
        "venv",
        "env",
        ".tox",
        ".nox",
        "node_modules",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "uploads",
        ".ipynb_checkpoints",
    }
)


def _skipped(rel: Path, root: Path) -> bool:
    for i, part in enumerate(rel.parts[:-1]):
        if part in SKIP_DIRS or (root.joinpath(*rel.parts[: i + 1]) / "pyvenv.cfg").exists():
            return True
    return rel.name == MANIFEST


def select_files(root: str | Path) -> dict[str, Path]:
    """`{relative posix path: file}` of what a sync of `root` sends."""
    root = Path(root).resolve()
    rels: list[str] | None = None
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=60,
        )
        rels = [r for r in out.stdout.decode().split("\0") if r]
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        rels = None  # not a git checkout (or no git): walk it
    if rels is None:
        patterns = _gitignore(root)
        rels = []
        for dirpath, dirs, files in os.walk(root):
            d = Path(dirpath)
            dirs[:] = sorted(
                x
                for x in dirs
                if x not in SKIP_DIRS
                and not (d / x / "pyvenv.cfg").exists()
                and not _ignored((d / x).relative_to(root).as_posix(), True, patterns)
            )
            for f in sorted(files):
                rel = (d / f).relative_to(root).as_posix()
                if not _ignored(rel, False, patterns):
                    rels.append(rel)
    out_files: dict[str, Path] = {}
    for rel in rels:
        p = root / rel
        if p.is_file() and not p.is_symlink() and not _skipped(Path(rel), root):
            out_files[rel] = p
    return out_files


def _gitignore(root: Path) -> list[str]:
    """The root `.gitignore`'s patterns, for a directory that is not a git checkout."""
    try:
        lines = (root / ".gitignore").read_text().splitlines()
    except OSError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "!"))]


def _ignored(rel: str, is_dir: bool, patterns: list[str]) -> bool:
    """A simple `.gitignore` match (no negation): `name`, `*.log`, `dir/`, `/top/path`."""
    name = rel.rsplit("/", 1)[-1]
    for pat in patterns:
        if pat.endswith("/"):
            if not is_dir:
                continue
            pat = pat.rstrip("/")
        if "/" in pat.strip("/"):
            if fnmatch.fnmatch(rel, pat.lstrip("/")):
                return True
        elif pat.startswith("/"):
            if fnmatch.fnmatch(rel, pat[1:]):
                return True
        elif fnmatch.fnmatch(name, pat):
            return True
    return False


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        d = Path(dirpath)
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not (d / x / "pyvenv.cfg").exists()]
        for f in files:
            p = d / f
            rel = p.relative_to(root)
            if p.is_file() and not p.is_symlink() and rel.name != MANIFEST:
                out[rel.as_posix()] = _sha(p)
    return out


def snapshot(root: str | Path = ".") -> int:
    """Record the hashes of the files in `root` (before the command runs)."""
    root = Path(root)
    (root / MANIFEST).write_text(json.dumps(_tree(root)))
    return len(json.loads((root / MANIFEST).read_text()))


def collect(root: str | Path = ".") -> list[str]:
    """Copy files created or changed since `snapshot` into `root/uploads/`; return their paths."""
    root = Path(root)
    try:
        before = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        before = {}
    changed = [rel for rel, sha in _tree(root).items() if before.get(rel) != sha]
    for rel in changed:
        dest = root / "uploads" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest)
    return sorted(changed)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "snapshot":
        snapshot()
    elif what == "collect":
        files = collect()
        print(f"[ow exec] {len(files)} changed file(s) to bring back", file=sys.stderr)
    else:
        print("usage: python -m openweights.cluster._sync snapshot|collect", file=sys.stderr)
        sys.exit(2)
