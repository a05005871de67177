"""Keep the ``--help`` blocks of docs/CLI.md equal to what the parser prints.

    python docs/gen_cli.py           # rewrite the blocks of docs/CLI.md in place
    python docs/gen_cli.py --check   # exit 1 and print a diff if docs/CLI.md is stale

The parser is ``fastbroker.cli.build_parser()`` of the ``fastbroker`` that Python
imports (with the venv's Python: the installed package, so ``make install`` first).
For the top-level parser and every sub-command, nested ones included (``store
check``), docs/CLI.md holds the exact ``--help`` text in a fenced block between

    <!-- cli:begin NAME -->
    <!-- cli:end NAME -->

where NAME is the command's prog: ``fastbroker``, ``fastbroker broker``, ...,
``fastbroker store check``. The text around the blocks is prose, left alone. A
command with no block yet gets one appended at the end of the file (move it next to
its prose); a block whose command is gone is reported, and left for a human to delete.

The help is rendered 100 columns wide (COLUMNS, which argparse reads through
shutil.get_terminal_size), without colour, with the progs above whatever sys.argv[0]
is: the same text on every terminal. argparse's layout differs slightly between
Python versions, so the file records the version it was generated with
(``<!-- cli:python X.Y -->``); tests/test_cli_reference.py compares only on that
version. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

CLI_MD = Path(__file__).resolve().parent / "CLI.md"
COLUMNS = "100"
TOP_PROG = "fastbroker"
BEGIN = "<!-- cli:begin {} -->"
END = "<!-- cli:end {} -->"
BLOCK_RE = re.compile(r"<!-- cli:begin (?P<name>[^>]*?) -->\n(?P<body>.*?)<!-- cli:end (?P=name) -->", re.DOTALL)
VERSION_RE = re.compile(r"<!-- cli:python (?P<version>[0-9.]+) -->")
PLACEHOLDER = "(Not described yet.)"  # the prose of an appended block, until someone writes it


def python_version() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


@contextlib.contextmanager
def fixed_terminal() -> Iterator[None]:
    """COLUMNS=100 and no colour for the time of the block (the environment is put back)."""
    saved = {name: os.environ.get(name) for name in ("COLUMNS", "NO_COLOR", "FORCE_COLOR", "PYTHON_COLORS")}
    os.environ["COLUMNS"] = COLUMNS
    os.environ["NO_COLOR"] = "1"
    os.environ.pop("FORCE_COLOR", None)
    os.environ.pop("PYTHON_COLORS", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_parser() -> argparse.ArgumentParser:
    from fastbroker.cli import build_parser as build

    with fixed_terminal():
        return build()


def commands(parser: argparse.ArgumentParser, prog: str = TOP_PROG) -> list[tuple[str, argparse.ArgumentParser]]:
    """(prog, parser) for `parser` and every sub-command below it, depth first in the
    parser's order; each parser's prog is set to its deterministic name on the way."""
    parser.prog = prog
    found = [(prog, parser)]
    seen = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias of a command already listed
                    continue
                seen.add(id(sub))
                found.extend(commands(sub, f"{prog} {name}"))
    return found


def render(name: str, parser: argparse.ArgumentParser) -> str:
    """The body of one block: the command line and its help, fenced."""
    with fixed_terminal():
        text = parser.format_help()
    lines = [line.rstrip() for line in text.rstrip("\n").split("\n")]
    body = "\n".join(lines)
    return f"```text\n$ {name} --help\n{body}\n```\n"


def blocks(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """Every command's block body, by name, in the parser's order."""
    return {name: render(name, sub) for name, sub in commands(parser or build_parser())}


def update(text: str, wanted: dict[str, str]) -> tuple[str, list[str], list[str]]:
    """`text` with every block replaced by its current body, the version marker set and
    blocks appended for commands that had none. Returns (new text, names appended,
    names of blocks whose command no longer exists)."""
    present: list[str] = []
    stale: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        present.append(name)
        if name not in wanted:
            stale.append(name)
            return match.group(0)
        return BEGIN.format(name) + "\n" + wanted[name] + END.format(name)

    new = BLOCK_RE.sub(replace, text)
    marker = f"<!-- cli:python {python_version()} -->"
    if VERSION_RE.search(new):
        new = VERSION_RE.sub(marker, new, count=1)
    else:
        new = marker + "\n" + new
    missing = [name for name in wanted if name not in present]
    if missing:
        new = new.rstrip("\n") + "\n"
        for name in missing:
            new += f"\n## `{name}`\n\n{PLACEHOLDER}\n\n{BEGIN.format(name)}\n{wanted[name]}{END.format(name)}\n"
    return new, missing, stale


def recorded_version(text: str) -> str | None:
    match = VERSION_RE.search(text)
    return match.group("version") if match else None


def check(path: Path = CLI_MD, parser: argparse.ArgumentParser | None = None) -> str:
    """'' if `path` is current; otherwise what is wrong: missing or stale blocks and a
    unified diff from the file to what `python docs/gen_cli.py` would write."""
    text = path.read_text(encoding="utf-8")
    new, missing, stale = update(text, blocks(parser))
    problems = []
    if missing:
        problems.append("commands without a block: " + ", ".join(missing))
    if stale:
        problems.append("blocks of commands that do not exist: " + ", ".join(stale))
    if new != text:
        problems.extend(
            line.rstrip("\n")
            for line in difflib.unified_diff(
                text.splitlines(True), new.splitlines(True), str(path), str(path) + " (generated)"
            )
        )
    if problems and recorded_version(text) not in (None, python_version()):
        problems.insert(
            0, f"note: {path.name} was generated with Python {recorded_version(text)}, this is {python_version()}"
        )
    return "\n".join(problems)


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(
        prog="gen_cli.py", description="Rewrite (or --check) the --help blocks of docs/CLI.md."
    )
    cli.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 and print a diff if the file is stale"
    )
    cli.add_argument("path", nargs="?", type=Path, default=CLI_MD, help="the file (default: docs/CLI.md)")
    args = cli.parse_args(argv)
    if args.check:
        problems = check(args.path)
        if problems:
            print(problems)
            print(f"{args.path} is stale: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    text = args.path.read_text(encoding="utf-8")
    new, missing, stale = update(text, blocks())
    if new != text:
        args.path.write_text(new, encoding="utf-8")
        print(f"rewrote {args.path}")
    for name in missing:
        print(f"appended a block for {name!r} at the end: move it to its prose", file=sys.stderr)
    for name in stale:
        print(f"block {name!r} has no command any more: delete it", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
