"""mkdocs hooks (mkdocs.yml ``hooks:``): the CLI page's reference, and a guard against markup the site cannot render.

* A page that contains ``<!-- cli-reference -->`` gets, in its place, one section per command (``maxq train``,
  ``export``, ``verify``, ``eval``) with its description and a table of every argument, its choices and its help:
  the page cannot drift from the parser.
* Every rendered page (API reference included) is searched for reStructuredText the Markdown site shows as raw
  text: Sphinx roles (``:class:`...` ``, ``:func:``, ``:meth:``, ...), ``::`` literal-block openers and ``====``
  table rules. Each one found is a warning, so the strict build (``make docs``, tests/test_docs.py) fails; write
  Markdown instead: cross-references as ``[`maxq.fold_`][maxq.fold_]``, code in fenced blocks.
"""

from __future__ import annotations

import argparse
import html
import logging
import re

MARKER = "<!-- cli-reference -->"


def _cell(text: str) -> str:
    return text.replace("%%", "%").replace("|", "\\|").replace("\n", " ")


def _names(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = list(action.option_strings)
    if isinstance(action, argparse.BooleanOptionalAction):
        names = [n for n in names if not n.startswith("--no-")] + [n for n in names if n.startswith("--no-")]
    metavar = action.metavar
    if action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction):
        metavar = metavar or action.dest.upper()
        metavar = " ".join(metavar) if isinstance(metavar, tuple) else metavar
        return ", ".join(f"`{n} {metavar}`" for n in names)
    return ", ".join(f"`{n}`" for n in names)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text = f"{text} (one of: {', '.join(f'`{c}`' for c in action.choices)})".strip()
    return _cell(text)


def cli_reference() -> str:
    """Markdown for every ``maxq`` command and argument."""
    from maxq.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, command in sub.choices.items():
        out += [f"### maxq {name}", "", _cell(command.description or ""), ""]
        for group in command._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = {"positional arguments": "arguments", "optional arguments": "options"}.get(group.title, group.title)
            out += [f"**{title}**", "", "| argument | meaning |", "|---|---|"]
            out += [f"| {_names(a)} | {_help(a)} |" for a in actions]
            out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown


log = logging.getLogger("mkdocs.plugins.maxq_docs")  # mkdocs counts its warnings: --strict fails on them

#: reStructuredText that Markdown renders literally: Sphinx roles, "::" literal-block openers, "====" table rules
RAW_MARKUP = re.compile(
    r"(:(?:class|func|meth|mod|data|attr|obj|exc|ref|py:\w+):`?[\w.~]+`?)"  # a role (backticks become <code>)
    r"|(\w::(?=\s*$))"  # a literal-block opener at a paragraph's end
    r"|(^\s*={4,}(?:\s+={4,})+\s*$)",  # a table rule
    re.M,
)


def raw_markup(page_html: str) -> list[str]:
    """The raw reStructuredText left in a rendered page, as the reader sees it (tags stripped; code blocks, which
    may show anything, left out)."""
    text = re.sub(r"<pre.*?</pre>", "", page_html, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return [match.group(0).strip() for match in RAW_MARKUP.finditer(text)]


def on_page_content(page_html: str, page, config, files) -> str:  # mkdocs hook
    for found in raw_markup(page_html):
        log.warning(
            "%s shows raw reStructuredText %r: write Markdown (see scripts/docs_hooks.py)", page.file.src_uri, found
        )
    return page_html
