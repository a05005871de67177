"""The docs cannot drift: docs/CLI.md holds the parser's exact --help for every command
(docs/gen_cli.py writes and checks it), and every relative link in the Markdown docs
leads to a file, and to a heading of it, that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN_CLI = ROOT / "docs" / "gen_cli.py"
LINKED_DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])


def _load_gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", GEN_CLI)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_cli = _load_gen_cli()


def test_cli_reference_is_current():
    text = gen_cli.CLI_MD.read_text(encoding="utf-8")
    recorded = gen_cli.recorded_version(text)
    assert recorded is not None, "docs/CLI.md has no <!-- cli:python X.Y --> marker: run python docs/gen_cli.py"
    if recorded != gen_cli.python_version():
        pytest.skip(f"docs/CLI.md was generated with Python {recorded} (argparse's layout differs between versions)")
    problems = gen_cli.check()
    assert not problems, (
        "docs/CLI.md is stale; run `python docs/gen_cli.py` (with the venv's Python, after make install)\n" + problems
    )


def test_every_command_has_a_block():
    names = [name for name, _ in gen_cli.commands(gen_cli.build_parser())]
    # The walk reaches the sub-commands and the nested ones.
    assert {"fastbroker", "fastbroker broker", "fastbroker store", "fastbroker store check"} <= set(names), names
    text = gen_cli.CLI_MD.read_text(encoding="utf-8")
    documented = [match.group("name") for match in gen_cli.BLOCK_RE.finditer(text)]
    missing = [name for name in names if name not in documented]
    assert not missing, (
        f"commands without a --help block in docs/CLI.md: {missing}; run python docs/gen_cli.py and describe them"
    )
    unknown = [name for name in documented if name not in names]
    assert not unknown, f"docs/CLI.md has blocks of commands the parser does not have: {unknown}"
    repeated = sorted({name for name in documented if documented.count(name) > 1})
    assert not repeated, f"commands with more than one block: {repeated}"
    assert gen_cli.PLACEHOLDER not in text, "docs/CLI.md has a command appended by gen_cli.py and not described yet"


# --- links --------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose_lines(text: str):
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped but
    - and _, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set:
    found: set = set()
    seen: dict = {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            slug = _slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _links(path: Path):
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(CODE_SPAN.sub("code", line)):
            yield match.group(2)


def test_slug_is_githubs():
    assert _slug("`fastbroker keygen NAME [--dir DIR]`") == "fastbroker-keygen-name---dir-dir"
    assert _slug("`Client` (DEALER, protocol FBC01)") == "client-dealer-protocol-fbc01"
    assert _slug("10.6 Routing by id and kept outcomes") == "106-routing-by-id-and-kept-outcomes"
    assert (
        _slug("Durable store throughput (`bench/store_throughput.py`)")
        == "durable-store-throughput-benchstore_throughputpy"
    )


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"broken links in {doc.relative_to(ROOT)}:\n" + "\n".join(broken)
