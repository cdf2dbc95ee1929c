"""mkdocs hook (mkdocs.yml ``hooks:``): the CLI page's reference, generated from ``maxq.cli.build_parser()``.

A page that contains ``<!-- cli-reference -->`` gets, in its place, one section per command (``maxq train``,
``export``, ``verify``, ``eval``) with its description and a table of every argument, its choices and its help: the
page cannot drift from the parser.
"""

from __future__ import annotations

import argparse

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
