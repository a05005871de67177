"""protocol.py is the one source of the protocol's constants: the generated
_protocol.pxd matches it, the compiled core refuses a stale build, and no other module
of the package or the benchmarks defines a constant of its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fastbroker import protocol

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "src" / "fastbroker"


def test_generated_pxd_is_current():
    # The source tree's pxd, not the installed copy's: that is what a build compiles.
    assert (SOURCE / "_protocol.pxd").read_text() == protocol.render_pxd(), "run: python src/fastbroker/protocol.py"


def test_check_compiled_accepts_its_own_values_and_refuses_others():
    values = protocol.compiled_values()
    signatures = (
        protocol.WORKER_SIGNATURE,
        protocol.CLIENT_SIGNATURE,
        protocol.CLIENT_SIGNATURE_V2,
        protocol.WORKER_SIGNATURE_V2,
    )
    protocol.check_compiled(dict(values), signatures)
    stale = dict(values, R_OK=values["R_OK"] + 1)
    with pytest.raises(ImportError, match="R_OK"):
        protocol.check_compiled(stale, signatures)
    with pytest.raises(ImportError, match="N_COUNTERS"):
        protocol.check_compiled({k: v for k, v in values.items() if k != "N_COUNTERS"}, signatures)
    with pytest.raises(ImportError):
        protocol.check_compiled(values, (b"FBW01", b"FBC02", b"FBC01", b"FBW02"))


def test_derived_values_follow_the_tuples():
    values = protocol.compiled_values()
    assert [values["CNT_" + name.upper()] for name in protocol.COUNTERS] == list(range(len(protocol.COUNTERS)))
    assert values["N_STATS"] == len(protocol.stats_fields())
    assert values["N_DROP_REASONS"] == len(protocol.DROP_REASONS)
    drop_codes = sorted(v for k, v in values.items() if k.startswith("DROP_"))
    assert drop_codes == list(range(len(protocol.DROP_REASONS)))
    for name in ("CMD_READY", "C_SUBMIT", "R_OK"):
        assert bytes([values[name]]) == getattr(protocol, name)


def _protocol_names() -> set:
    return {n for n in vars(protocol) if re.fullmatch(r"[A-Z][A-Z0-9_]+", n) and not n.startswith("_")}


@pytest.mark.parametrize("folder", ["src/fastbroker", "bench"])
def test_no_other_module_defines_a_protocol_constant(folder):
    names = _protocol_names() - {"PXD_PATH"}
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        if path == SOURCE / "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in names:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {target.id}")
    for path in sorted((REPO / folder).rglob("*.pyx")) + sorted((REPO / folder).rglob("*.pxi")):
        # The module docstring may quote messages; blank it, keeping line numbers.
        text = re.sub(
            r'^((?:#.*\n)*)"""[\s\S]*?"""', lambda m: "\n" * m.group(0).count("\n"), path.read_text(), count=1
        )
        for lineno, line in enumerate(text.splitlines(), 1):
            match = re.match(r"\s+([A-Z][A-Z0-9_]+)\s*=", line) or re.match(r"cdef\s.*?\b([A-Z][A-Z0-9_]+)\s*=", line)
            if match and match.group(1) in names:
                offenders.append(f"{path.relative_to(REPO)}:{lineno} {match.group(1)}")
            if re.search(r'b"FB[CW]0\d"', line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{lineno} signature literal")
    assert not offenders, offenders


def test_the_package_uses_no_signature_literal():
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "protocol.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r'b"FB[CW]0\d"', line):
                found.append(f"{path.relative_to(REPO)}:{lineno}")
    assert not found, found
