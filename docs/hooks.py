"""MkDocs hook: put files that live outside docs/ into the site without copying them.

The benchmark write-ups (``benchmarks/README.md``, the generated ``benchmarks/RESULTS.md``) and
their plots, and ``infra/kubernetes.md``, stay where the code that writes or uses them lives;
the site shows them at ``benchmarks/...`` and ``infra/kubernetes.md``, so one copy is the truth.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
INCLUDED = ["benchmarks/README.md", "benchmarks/RESULTS.md", "benchmarks/*.png", "infra/kubernetes.md"]


def on_files(files, config):
    for pattern in INCLUDED:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(
                    File(
                        uri,
                        src_dir=str(ROOT),
                        dest_dir=config["site_dir"],
                        use_directory_urls=config["use_directory_urls"],
                    )
                )
    return files
