"""The documentation: the site builds strictly, the generated references match the code, the
README is short and its links resolve, and the Getting started commands run as written."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 150

# A fenced shell block that tests/test_docs.py runs: this marker on the line before the fence.
RUNNABLE = re.compile(r"^<!-- runnable -->\n```(?:bash|sh)\n(.*?)^```", re.M | re.S)


def _gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mkdocs_command() -> list[str]:
    """mkdocs of this interpreter (the dev extra), else RINGFLOW_MKDOCS (an mkdocs executable)."""
    if importlib.util.find_spec("mkdocs") is not None and importlib.util.find_spec("material") is not None:
        return [sys.executable, "-m", "mkdocs"]
    exe = os.environ.get("RINGFLOW_MKDOCS")
    if exe:
        return [exe]
    pytest.fail(
        "mkdocs and mkdocs-material are not installed in this interpreter: `make install` (the dev extra pins them)"
    )


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _page_html(site: Path, page: str) -> Path:
    stem = page[: -len(".md")]
    if stem == "index" or stem.endswith(("/index", "/README")):
        stem = stem.rpartition("/")[0]
    return site / stem / "index.html" if stem else site / "index.html"


def build_site(site: Path) -> Path:
    """``mkdocs build --strict`` into ``site`` (a broken link or a missing page fails)."""
    p = subprocess.run(
        [*_mkdocs_command(), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return site


def test_site_builds_strictly_and_every_page_renders(tmp_path):
    site = build_site(tmp_path / "site")
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = _nav_pages(nav)
    assert len(pages) >= 20, pages
    for page in pages:
        html = _page_html(site, page)
        assert html.is_file(), f"{page}: no {html.relative_to(site)} in the built site"
        text = html.read_text()
        assert "<h1" in text and 'class="md-content__inner' in text, f"{page} rendered without content"
    config = _page_html(site, "reference/config.md").read_text()
    assert "training.world_size" in config and "gate.floors" in config
    assert "ringflow monitor" in _page_html(site, "reference/cli.md").read_text()
    for image in ["img/prefect-flow-run.png", "img/mlflow-run.png", "benchmarks/scale.png"]:
        assert (site / image).is_file(), f"{image} missing from the site"


def test_generated_references_are_up_to_date():
    gen = _gen_reference()
    stale = [str(p.relative_to(ROOT)) for p in gen.stale_pages()]
    assert not stale, (
        f"{stale} differ from what the code generates: run `make docs-reference` "
        f"(python docs/gen_reference.py) and commit the result"
    )


def test_config_reference_lists_every_field():
    """Every dotted key of the config is a row of the reference, with its description."""
    from ringflow.training.config import PipelineConfig, config_paths

    text = (DOCS / "reference" / "config.md").read_text()
    missing = [k for k in config_paths() if f"| `{k}` |" not in text]
    assert not missing, f"config keys missing from docs/reference/config.md: {missing}"
    world_size = PipelineConfig.model_fields["training"].annotation.model_fields["world_size"]
    assert f"| `training.world_size` | `int` | `2` | {_gen_reference()._cell(world_size.description)} |" in text


def test_cli_reference_lists_every_command_and_option():
    import typer

    from ringflow.flows.cli import app

    text = (DOCS / "reference" / "cli.md").read_text()

    def walk(cmd, path):
        yield path, cmd
        if hasattr(cmd, "list_commands"):
            ctx = cmd.context_class(cmd)
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), f"{path} {name}")

    for path, cmd in walk(typer.main.get_command(app), "ringflow"):
        assert f"`{path}`" in text, f"{path} missing from docs/reference/cli.md"
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt != "--help":
                    assert opt in text, f"{path} {opt} missing from docs/reference/cli.md"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (what a README link's #fragment must match)."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.M | re.S)  # no headings in code
    return {_github_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def _links(md: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def test_every_readme_link_resolves():
    links = _links(README)
    assert len(links) >= 10, links
    broken = []
    for link in links:
        if re.match(r"[a-z]+://", link):
            assert re.match(r"https?://(127\.0\.0\.1|localhost)[:/]", link), (
                f"README links outside the machine ({link}): it cannot be checked offline"
            )
            continue
        target, _, anchor = link.partition("#")
        path = (README.parent / target).resolve() if target else README
        if not path.exists():
            broken.append(f"{link}: no {target}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {target or 'README.md'}")
    assert not broken, "README.md has broken links:\n  " + "\n  ".join(broken)


def test_github_slug_matches_github():
    assert _github_slug("2. Install and run: `make run`") == "2-install-and-run-make-run"
    assert _github_slug("Scale out: from one box to N hosts") == "scale-out-from-one-box-to-n-hosts"
    assert _github_slug("What `make run` shows") == "what-make-run-shows"


def _runnable_blocks() -> list[str]:
    return RUNNABLE.findall((DOCS / "getting-started.md").read_text())


def test_getting_started_marks_its_commands_runnable():
    blocks = _runnable_blocks()
    joined = "\n".join(blocks)
    assert len(blocks) >= 3, blocks
    for command in ["ringflow run -c configs/smoke.yaml", "ringflow monitor", "ringflow up", "ringflow down"]:
        assert command in joined, f"{command!r} is not in a runnable block of docs/getting-started.md"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.horovod
@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_getting_started_commands_run_as_written(tmp_path):
    """Each runnable block, in order, from the repository root, in a fresh RINGFLOW_HOME, with this
    venv's scripts on PATH (what `source .venv/bin/activate` gives a reader). The stack that
    `ringflow up` starts gets free ports (4200/5000/8000 may be taken on a shared machine) and is
    stopped whatever happens."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_", "RINGFLOW_"))}
    env.update(
        RINGFLOW_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RINGFLOW_PREFECT_PORT=str(_free_port()),
        RINGFLOW_MLFLOW_PORT=str(_free_port()),
        RINGFLOW_EVIDENTLY_PORT=str(_free_port()),
    )
    blocks = _runnable_blocks()
    outputs = []
    try:
        for i, block in enumerate(blocks, start=1):
            p = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,
            )
            outputs.append(p.stdout)
            assert p.returncode == 0, (
                f"docs/getting-started.md runnable block {i} exited {p.returncode}:\n"
                f"{block}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
            )
    finally:
        if (home / "stack").is_dir():
            subprocess.run(
                [str(Path(sys.executable).with_name("ringflow")), "down"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
    text = "\n".join(outputs)
    assert "PROMOTED to @champion" in text, text[-3000:]
    assert "ringflow: monitored flights-delay v1 on 2013-03" in text, text[-3000:]
    assert f"Prefect UI  http://127.0.0.1:{env['RINGFLOW_PREFECT_PORT']}" in text, text[-3000:]
    assert (home / "mlflow.db").is_file()  # the blocks used the temporary home
