"""Where the running code came from: the installed version and its source commit.

The commit is recorded on every registered model (tag ``git_commit``) and printed by
``ringflow --version``. A checkout answers with ``git``; an install without one answers from
the install's own record (PEP 610 ``direct_url.json``: ``pip install git+URL`` writes the commit).
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "ringflow"
SOURCE_ROOT = Path(__file__).resolve().parents[1]
"""The checkout's root in a checkout (editable install); the installed package's folder otherwise."""


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def _checkout_commit() -> str | None:
    """HEAD of the checkout this code runs from; None when the code is not a checkout's root (a
    wheel in site-packages, even inside someone else's repository)."""
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = top.stdout.split()
    if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != SOURCE_ROOT:
        return None
    return lines[1]


def _installed_commit() -> str | None:
    try:
        record = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not record:
        return None
    return (json.loads(record).get("vcs_info") or {}).get("commit_id")


def source_commit() -> str | None:
    """The commit of the running code, or None when neither a checkout nor the install knows it."""
    return _checkout_commit() or _installed_commit()
