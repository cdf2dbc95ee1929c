"""The documentation site: it builds strictly (broken links, unknown names, docstrings that do not parse), the CLI
page lists every argument, the reference covers the public API, and the pages' Python code blocks run.

Convention: every fenced ``python`` block of a page runs, in order, in one namespace per page (from a temporary
folder), unless the line before its fence is ``<!-- no-run -->``; a block after ``<!-- torchrun -->`` is a whole
script run by ``torchrun`` in two CPU processes (gloo). ``console``/``bash`` blocks are shown, not run.
"""

from __future__ import annotations

import argparse
import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import maxq
from maxq.cli import build_parser
from tests.conftest import one_thread
from tests.torchrun import once

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NO_RUN = "<!-- no-run -->"
TORCHRUN = "<!-- torchrun -->"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks(text: str) -> tuple[list[str], int]:
    """The runnable ``python`` blocks of a Markdown page, and how many were marked ``no-run``."""
    run, skipped = [], 0
    for block in BLOCK.finditer("\n" + text):
        if block["lang"] != "python":
            continue
        if block["before"].strip() in (NO_RUN, TORCHRUN):
            skipped += 1
        else:
            run.append(block["code"])
    return run, skipped


def torchrun_blocks(text: str) -> list[str]:
    """The ``python`` blocks of a Markdown page marked ``<!-- torchrun -->`` (whole scripts)."""
    return [b["code"] for b in BLOCK.finditer("\n" + text) if b["lang"] == "python" and b["before"].strip() == TORCHRUN]


def test_block_convention():
    page = "text\n\n```python\na = 1\n```\n\n<!-- no-run -->\n```python\nb = 2\n```\n\n```bash\nmake\n```\n"
    assert python_blocks(page) == (["a = 1\n"], 1)
    page += "\n<!-- torchrun -->\n```python\nc = 3\n```\n"
    assert python_blocks(page) == (["a = 1\n"], 2) and torchrun_blocks(page) == ["c = 3\n"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    def build(out: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        env["NO_MKDOCS_2_WARNING"] = "1"
        run = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        warnings = [line for line in run.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
        assert run.returncode == 0 and not warnings, "\n".join(warnings) or run.stderr[-3000:]

    return once(tmp_path_factory, "site", build)  # built once however xdist tears module fixtures down


@pytest.mark.xdist_group("docs_site")  # one worker builds the site once
def test_site_builds_strictly_and_offline(site):
    pages = {p.relative_to(site).with_suffix("").as_posix() for p in site.rglob("*.html")}
    assert {"index", "library", "cli", "tutorials/deployment", "reference/maxq", "METHOD", "RESULTS"} <= pages
    index = (site / "index.html").read_text()
    assert "fonts.googleapis" not in index and "fonts.gstatic" not in index  # nothing fetched when read offline


@pytest.mark.xdist_group("docs_site")  # one worker builds the site once
def test_the_site_works_opened_from_the_disk(site):
    # Issue 27: over file://, every navigation link opened a directory listing, and search did not work.
    for page in site.rglob("*.html"):
        if page.name == "404.html":  # a web server's error page (absolute links), never opened from the disk
            continue
        html = page.read_text()
        for link in re.findall(r'href="([^"#:?]+)(?:#[^"]*)?"', html):  # links inside the site
            target = (page.parent / link).resolve()
            assert target.is_file(), f"{page.relative_to(site)} links to {link}, which is no file"
    # Search over file://: the offline plugin's index as a script (a browser refuses to fetch the .json there).
    assert (site / "search" / "search_index.js").read_text().startswith("var __index = ")


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raw_restructuredtext_fails_the_strict_build(tmp_path):
    # Issue 27: the API reference showed 55 Sphinx roles as raw text; the strict build now refuses them.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# ok\n\nPlain Markdown, `code` and a [link](other.md).\n")
    (tmp_path / "docs" / "other.md").write_text("# bad\n\nSee :class:`maxq.Sparsifier` and :func:`fold_`. Usage::\n")
    (tmp_path / "mkdocs.yml").write_text(
        f"site_name: t\nhooks:\n  - {ROOT / 'scripts' / 'docs_hooks.py'}\nnav:\n  - index.md\n  - other.md\n"
    )
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode != 0
    assert "other.md shows raw reStructuredText ':class:maxq.Sparsifier'" in run.stderr
    assert ":func:fold_" in run.stderr and "'e::'" in run.stderr and "index.md shows" not in run.stderr


def test_docstrings_hold_no_restructuredtext():
    # Rendered or not, docstrings are written in the Markdown the site renders (cross-references that link).
    pattern = _hooks().RAW_MARKUP
    found = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def _options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: [o for a in p._actions if not isinstance(a, argparse._HelpAction) for o in a.option_strings]
        for name, p in sub.choices.items()
    }


@pytest.mark.xdist_group("docs_site")  # one worker builds the site once
def test_cli_page_lists_every_command_and_flag(site):
    html = (site / "cli.html").read_text()
    options = _options(build_parser())
    assert set(options) == {"train", "export", "verify", "eval"}
    for command, flags in options.items():
        assert f"maxq {command}" in html
        missing = [flag for flag in flags if f"<code>{flag}" not in html]
        assert not missing, f"maxq {command}: {missing}"


@pytest.mark.xdist_group("docs_site")  # one worker builds the site once
def test_reference_covers_the_public_api(site):
    page = (DOCS / "reference" / "maxq.md").read_text()
    documented = set(re.findall(r"^::: maxq\.(\w+)$", page, re.M))
    assert set(maxq.__all__) - {"__version__"} <= documented
    html = (site / "reference" / "maxq.html").read_text()
    assert 'id="maxq.sparsify_"' in html and "Raises" in html


@pytest.mark.parametrize("module", ["maxq.core.config", "maxq.core.check", "maxq.core.nm", "maxq.core.schedules"])
def test_docstring_examples(module):
    failed, attempted = doctest.testmod(importlib.import_module(module), raise_on_error=False)[:2]
    assert attempted > 0 and failed == 0


PAGES = [
    "index.md",
    "library.md",
    "sharded.md",
    *sorted(p.relative_to(DOCS).as_posix() for p in (DOCS / "tutorials").glob("*.md")),
]


@pytest.mark.parametrize("page", PAGES)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    blocks, _ = python_blocks((DOCS / page).read_text())
    if not blocks:
        pytest.skip(f"{page} has no runnable python block")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs:{page}"}
    with one_thread():
        for i, code in enumerate(blocks):
            exec(compile(code, f"docs/{page} block {i + 1}", "exec"), namespace)
    assert "maxq" in namespace


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
@pytest.mark.parametrize("page", ["sharded.md"])
def test_torchrun_blocks_run_in_two_processes(page, tmp_path):
    from . import torchrun

    scripts = torchrun_blocks((DOCS / page).read_text())
    assert scripts, f"{page} has no torchrun block"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    for i, code in enumerate(scripts):
        work = tmp_path / f"block{i + 1}"
        work.mkdir()
        script = tmp_path / f"block{i + 1}.py"
        script.write_text(code)
        run = torchrun.run([str(script)], env=env, cwd=work, timeout=300, clean=[work])
        assert run.returncode == 0, f"docs/{page} torchrun block {i + 1}:\n" + run.stderr[-4000:]


def test_the_cli_page_names_every_model_and_dataset():
    # Issue 27: the page's list of models had fallen behind maxq.train.models.MODELS.
    from maxq.train.data import DATASETS
    from maxq.train.models import MODELS

    page = (DOCS / "cli.md").read_text()
    missing = [name for name in [*MODELS, *DATASETS] if f"`{name}`" not in page]
    assert not missing, f"docs/cli.md does not name {missing}"


#: the widest code line the site's column shows without scrolling (docs/stylesheets/extra.css widens it for this)
CODE_WIDTH = 100


def test_code_blocks_fit_the_column():
    # Issue 27: code blocks were wider than the column (up to 121 characters), on the pages and in docstrings.
    import textwrap

    fence = re.compile(r"^( *)```[\w-]*\n(.*?)^\1```", re.S | re.M)
    sources = [*DOCS.rglob("*.md"), *(ROOT / "src").rglob("*.py")]
    wide = [
        f"{path.relative_to(ROOT)}: {line}"
        for path in sources
        for block in fence.finditer(path.read_text())
        for line in textwrap.dedent(block.group(2)).splitlines()
        if len(line) > CODE_WIDTH
    ]
    assert not wide, "\n".join(wide)
