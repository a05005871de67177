"""The pure core mirrors the compiled one file by file, read from the source tree (no
build needed): each src/fastbroker/core/<part>.pxi has a <part>.py with the same
classes, their methods in the same order, and each method marked @cdef in Python
exactly where it is cdef in Cython. The names either twin has alone are listed below,
each with its reason; tests/test_core_api.py compares what the built cores show.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

CORE = Path(__file__).resolve().parent.parent / "src" / "fastbroker" / "core"
PXI_FOLDER = CORE

# Not compared: making and freeing (C memory needs __cinit__/__dealloc__, Python objects __init__).
LIFECYCLE = {"__cinit__", "__init__", "__dealloc__"}

# The allow-list: methods only one twin has, by (part, class). Each pure module says
# the same at its top, so that a reader diffing the two knows why.
COMPILED_ONLY = {
    # slot memory: a dict entry is made and freed with the entry
    ("idle_workers", "IdleWorkers"): {"alloc", "release"},
    # slot handles: a Req object carries its state (live while not FREE) and its id
    ("request_table", "RequestTable"): {"live", "write_id"},
    # the binary heap by hand: heapq in Python
    ("deadline_heap", "DeadlineHeap"): {"_place", "_sift_up", "_sift_down"},
    # an outcome not kept for lack of memory; freeing an outcome's frames by hand
    ("kept_outcomes", "KeptOutcomes"): {"not_kept", "release_frames"},
    # an entry's C memory: in Python an entry is a tuple appended
    ("journal", "Journal"): {"add"},
}
PURE_ONLY: Dict[Tuple[str, str], set] = {}

_CLASS = re.compile(r"cdef\s+class\s+(\w+)")
_METHOD = re.compile(r"    (cdef|cpdef|def)\s+([^(=]*?)(\w+)\(")
_STRUCT = re.compile(r"^cdef\s+struct\s+(\w+)", re.M)

Methods = List[Tuple[str, bool]]  # (name, is cdef), in file order


def parse_pxi(path: Path) -> Dict[str, Methods]:
    """The cdef classes of a .pxi file and their methods (a line of a class body at
    4 spaces: `cdef|cpdef|def [type ...] name(`)."""
    classes: Dict[str, Methods] = {}
    current = None
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0].rstrip()
        if not code:
            continue
        if not code[0].isspace():
            match = _CLASS.match(code)
            current = match.group(1) if match else None
            if current is not None:
                classes[current] = []
            continue
        match = _METHOD.match(code)
        if current is not None and match:
            classes[current].append((match.group(3), match.group(1) == "cdef"))
    return classes


def _is_cdef(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "cdef" for d in node.decorator_list)


def parse_py(path: Path) -> Dict[str, Methods]:
    """The classes of a pure part and their methods (marked @cdef or not)."""
    classes: Dict[str, Methods] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = [(f.name, _is_cdef(f)) for f in node.body if isinstance(f, ast.FunctionDef)]
    return classes


def _structs() -> set:
    """Struct names of _core.pxd: a pure class may stand for one (Req, Sess, Done)."""
    pxd = PXI_FOLDER.parent / "_core.pxd"
    return set(_STRUCT.findall(pxd.read_text())) if pxd.is_file() else set()


def _parts() -> List[str]:
    parts = sorted(p.stem for p in PXI_FOLDER.glob("*.pxi"))
    assert parts, f"no {PXI_FOLDER}/*.pxi: the compiled core's parts are missing"
    return parts


def test_every_part_has_its_twin():
    compiled = set(_parts())
    pure = {p.stem for p in CORE.glob("*.py")} - {"__init__"}
    assert compiled - pure == set(), "compiled parts without a pure twin"
    assert pure - compiled == set(), "pure modules without a compiled twin"


def test_the_allow_list_names_real_parts_and_is_explained():
    _parts()
    for (part, cls), names in {**COMPILED_ONLY, **PURE_ONLY}.items():
        assert cls in parse_pxi(PXI_FOLDER / f"{part}.pxi") or cls in parse_py(CORE / f"{part}.py"), (part, cls)
        docstring = ast.get_docstring(ast.parse((CORE / f"{part}.py").read_text())) or ""
        for name in names:
            assert name in docstring, f"core/{part}.py does not say why it has no {name}"


@pytest.mark.parametrize(
    "part",
    # No .pxi at all: one "" case, which fails on the missing file.
    [pytest.param(p, id=p) for p in sorted(q.stem for q in PXI_FOLDER.glob("*.pxi"))] or [""],
)
def test_part_mirrors_its_compiled_file(part):
    compiled = parse_pxi(PXI_FOLDER / f"{part}.pxi")
    pure_path = CORE / f"{part}.py"
    assert pure_path.is_file(), f"core/{part}.py is missing"
    pure = parse_py(pure_path)
    structs = _structs()
    assert set(compiled) <= set(pure), f"core/{part}.py lacks {sorted(set(compiled) - set(pure))}"
    extra = set(pure) - set(compiled) - structs
    assert not extra, f"core/{part}.py has classes the compiled part has not (nor structs of _core.pxd): {extra}"
    for cls, cmethods in compiled.items():
        skip_c = LIFECYCLE | COMPILED_ONLY.get((part, cls), set())
        skip_p = LIFECYCLE | PURE_ONLY.get((part, cls), set())
        c = [m for m in cmethods if m[0] not in skip_c]
        p = [m for m in pure[cls] if m[0] not in skip_p]
        assert [name for name, _ in p] == [name for name, _ in c], f"{part}.{cls}: methods differ in names or order"
        assert p == c, f"{part}.{cls}: @cdef marks differ from cdef: {[m for m, n in zip(p, c) if m != n]}"
        # An allow-listed name must really be absent from the other twin.
        assert not COMPILED_ONLY.get((part, cls), set()) & {n for n, _ in pure[cls]}, (part, cls)
        assert not PURE_ONLY.get((part, cls), set()) & {n for n, _ in cmethods}, (part, cls)
