"""API parity between the compiled core (fastbroker._core) and the pure one
(fastbroker._core_py), and the core selection by FASTBROKER_PURE.

This and test_core_differential.py are the test modules that import both cores directly.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
import uuid
from types import ModuleType

import pytest
import zmq

import fastbroker
from fastbroker import _common, _core_py, _select, protocol

CLASSES = ("BrokerCore", "IdleWorkers", "DeadlineHeap", "RequestTable", "RequestIds")
EXPORTS = CLASSES + ("monotonic",)
# Protocol methods the structures must share besides their public names.
DUNDERS = {
    "IdleWorkers": {"__contains__", "__len__"},
    "DeadlineHeap": {"__len__"},
    "RequestTable": {"__contains__", "__len__"},
    "RequestIds": {"__len__"},
    "BrokerCore": set(),
}


def _load_compiled():
    try:
        from fastbroker import _core
    except ImportError as exc:
        if _select.pure_requested():
            pytest.skip(f"compiled core unavailable under FASTBROKER_PURE=1: {exc}")
        pytest.fail(f"the compiled core must import in a normal run: {exc}")
    return _core


@pytest.fixture(scope="module")
def compiled():
    return _load_compiled()


@pytest.fixture(scope="module", params=["compiled", "pure"])
def either(request):
    return _load_compiled() if request.param == "compiled" else _core_py


def _public(obj) -> set:
    """The names obj shows to Python: not private, not state (the pure twin's
    __slots__; the compiled twin's cdef attributes are not visible), and not a method
    the pure twin marks @cdef (a cdef method of the compiled twin, not visible there)."""
    cls = obj if isinstance(obj, type) else type(obj)
    names = set()
    for name in dir(obj):
        attr = inspect.getattr_static(cls, name, None)
        if name.startswith("_") or inspect.ismemberdescriptor(attr) or getattr(attr, "__cdef__", False):
            continue
        names.add(name)
    return names


def _defined(module: ModuleType, *homes: str) -> dict:
    """Public classes and functions of a core module that the core defines (in one of
    the modules `homes`; not those it imports from elsewhere), by name."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and callable(obj)
        and (getattr(obj, "__module__", "") in homes or getattr(obj, "__module__", "").startswith("fastbroker.core."))
    }


def _compiled_defined(compiled: ModuleType) -> dict:
    return _defined(compiled, "fastbroker._core")


def _pure_defined() -> dict:
    names = _defined(_core_py, "fastbroker._core_py")
    # monotonic is time.monotonic itself (its __module__ is "time").
    names.update((name, getattr(_core_py, name)) for name in _core_py.__all__)
    return names


def test_compiled_core_imports_in_normal_run():
    if _select.pure_requested():
        pytest.skip("FASTBROKER_PURE is set")
    from fastbroker import _core

    assert _select.load("compiled") is _core


@pytest.mark.parametrize("name", EXPORTS)
def test_both_cores_export(compiled, name):
    assert callable(getattr(compiled, name))
    assert callable(getattr(_core_py, name))


def test_all_lists_the_exports():
    assert sorted(_core_py.__all__) == sorted(EXPORTS)


def test_every_compiled_name_is_in_the_pure_core(compiled):
    """Every class and function the compiled module defines (its API, and since the
    split its cdef parts, which Cython makes visible too) is in the pure module, of
    the same kind."""
    compiled_names = _compiled_defined(compiled)
    pure_names = _pure_defined()
    assert set(compiled_names) <= set(pure_names), f"only compiled: {sorted(set(compiled_names) - set(pure_names))}"
    for name, obj in compiled_names.items():
        assert inspect.isclass(obj) == inspect.isclass(pure_names[name]), name


def test_every_pure_name_is_in_the_compiled_core(compiled):
    compiled_names = _compiled_defined(compiled)
    pure_names = _pure_defined()
    assert set(pure_names) <= set(compiled_names), f"only pure: {sorted(set(pure_names) - set(compiled_names))}"


def test_every_class_shows_the_same_names(compiled):
    """The API classes, and the parts both cores have: the same public names."""
    pure_names = _pure_defined()
    for name, cobj in _compiled_defined(compiled).items():
        if inspect.isclass(cobj) and name in pure_names:
            assert _public(cobj) == _public(pure_names[name]), name


@pytest.mark.parametrize("name", CLASSES)
def test_class_public_names_match(compiled, name):
    compiled_names = _public(getattr(compiled, name))
    pure_names = _public(getattr(_core_py, name))
    assert compiled_names == pure_names, (
        f"{name}: only compiled {sorted(compiled_names - pure_names)}, only pure {sorted(pure_names - compiled_names)}"
    )


@pytest.mark.parametrize("name", ["IdleWorkers", "DeadlineHeap", "RequestTable", "RequestIds"])
def test_instance_public_names_match(compiled, name):
    compiled_names = _public(getattr(compiled, name)())
    pure_names = _public(getattr(_core_py, name)())
    assert compiled_names == pure_names, (
        f"{name}(): only compiled {sorted(compiled_names - pure_names)}, "
        f"only pure {sorted(pure_names - compiled_names)}"
    )


@pytest.mark.parametrize("name", CLASSES)
def test_class_protocols_match(compiled, name):
    for dunder in DUNDERS[name]:
        assert hasattr(getattr(compiled, name), dunder), (name, dunder)
        assert hasattr(getattr(_core_py, name), dunder), (name, dunder)


def _parameters(func):
    sig = inspect.signature(func)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", CLASSES)
def test_method_signatures_match(compiled, name):
    ccls, pcls = getattr(compiled, name), getattr(_core_py, name)
    for attr in sorted(_public(ccls) & _public(pcls)):
        cval, pval = inspect.getattr_static(ccls, attr), inspect.getattr_static(pcls, attr)
        if isinstance(pval, property):
            # Cython properties are getset descriptors: read-only data descriptors.
            assert hasattr(cval, "__get__") and not callable(cval), (name, attr)
            assert pval.fset is None, (name, attr)
            continue
        assert _parameters(getattr(ccls, attr)) == _parameters(getattr(pcls, attr)), (name, attr)


def test_request_table_constructor_forms(either):
    assert either.RequestTable(epoch=b"12345678").add()[:8] == b"12345678"
    assert either.RequestTable(b"abcdefgh").add()[:8] == b"abcdefgh"
    assert len(either.RequestTable(None).add()) == 16


def test_monotonic_is_monotonic_and_matches_time_monotonic(either):
    values = [either.monotonic() for _ in range(2_000)]
    assert all(isinstance(v, float) for v in values[:10])
    assert all(b >= a for a, b in zip(values, values[1:]))
    before = time.monotonic()
    value = either.monotonic()
    after = time.monotonic()
    # Same clock (CLOCK_MONOTONIC): bracketed by time.monotonic up to rounding.
    assert before - 0.001 <= value <= after + 0.001
    time.sleep(0.02)  # the point: the core's clock advances by what a known sleep takes
    assert either.monotonic() - value >= 0.019


# --- core selection -------------------------------------------------------------


def test_core_name_matches_environment():
    expected = "pure" if _select.pure_requested() else "compiled"
    assert fastbroker.core_name == expected
    assert _select.core_name == expected
    assert _select.core is _select.load(expected)
    assert _select.resolve(None) is _select.core


def test_missing_extension_falls_back_to_pure_with_one_warning(subprocess_env):
    """An unimportable extension: the pure core is live and one RuntimeWarning says why."""
    code = (
        "import sys, warnings\n"
        "sys.modules['fastbroker._core'] = None  # makes `import fastbroker._core` fail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastbroker, fastbroker.server.broker, fastbroker.cli\n"
        "print(fastbroker.core_name, len(caught), caught[0].category.__name__, caught[0].message)\n"
    )
    env = dict(subprocess_env)
    env.pop("FASTBROKER_PURE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    name, count, category, message = proc.stdout.split(" ", 3)
    assert (name, count, category) == ("pure", "1", "RuntimeWarning")
    assert "compiled core unavailable" in message


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"FASTBROKER_PURE": ""}, False),
        ({"FASTBROKER_PURE": "0"}, False),
        ({"FASTBROKER_PURE": " 0 "}, False),
        ({"FASTBROKER_PURE": "  "}, False),
        ({"FASTBROKER_PURE": "1"}, True),
        ({"FASTBROKER_PURE": "yes"}, True),
        ({"FASTBROKER_PURE": " 1\n"}, True),
        ({"OTHER": "1"}, False),
    ],
)
def test_pure_requested_parsing(environ, expected):
    assert _select.pure_requested(environ) is expected


def test_load_and_resolve(compiled):
    assert _select.load("pure") is _core_py
    assert _select.load("compiled") is compiled
    assert _select.resolve("pure") is _core_py
    assert _select.resolve("compiled") is compiled
    with pytest.raises(ValueError):
        _select.load("fast")


# --- behaviour both cores must share ---------------------------------------------


@pytest.fixture
def sockets():
    ctx = zmq.Context()
    tag = uuid.uuid4().hex
    req = ctx.socket(zmq.ROUTER)
    wrk = ctx.socket(zmq.ROUTER)
    req.setsockopt(zmq.ROUTER_MANDATORY, 1)
    wrk.setsockopt(zmq.ROUTER_MANDATORY, 1)
    ans = ctx.socket(zmq.PULL)
    for sock, kind in ((req, "req"), (wrk, "wrk"), (ans, "ans")):
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"inproc://api-{kind}-{tag}")
    yield req, wrk, ans
    for sock in (req, wrk, ans):
        sock.close(0)
    ctx.term()


def test_fresh_core_stats_and_properties(either, sockets):
    core = either.BrokerCore(*sockets, 1.5, 3, epoch=b"12345678")
    try:
        stats = core.stats()
        assert list(stats) == list(protocol.COUNTERS) + list(protocol.GAUGES) + ["drops", "latency"]
        assert all(stats[k] == 0 for k in protocol.COUNTERS + protocol.GAUGES)
        assert stats["drops"] == {}
        assert stats["latency"] == {
            "bounds": protocol.LATENCY_BOUNDS,
            "counts": [0] * (len(protocol.LATENCY_BOUNDS) + 1),
            "count": 0,
            "sum": 0.0,
        }
        assert core.events() == []
        assert core.timeout == 1.5
        assert core.tries == 3
        assert core.last_drop is None
        assert core.run(-1, 0) == protocol.RUN_TIMEOUT
    finally:
        core.close()
    plain = either.BrokerCore(*sockets)
    try:
        assert plain.timeout is None and plain.tries is None
    finally:
        plain.close()


@pytest.mark.parametrize(
    "timeout, tries",
    [
        (-1, None),
        (float("nan"), None),
        (float("inf"), None),
        ("soon", None),
        (None, 0),
        (None, -2),
        (None, 1.5),
        (None, True),
        (None, 2**31),
    ],
)
def test_bad_settings_raise_config_error(either, sockets, timeout, tries):
    with pytest.raises(_common.ConfigError):
        either.BrokerCore(*sockets, timeout, tries)


def test_bad_epoch_raises_value_error(either, sockets):
    with pytest.raises(ValueError):
        either.BrokerCore(*sockets, epoch=b"short")
