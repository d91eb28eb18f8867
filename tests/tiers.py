"""Test tiers: a test that starts a federation, a Flower server, a zk0 command, warm workers or containers is `slow`.

Marked automatically (conftest.py), so a new federation test is tiered without anyone remembering:
a test is slow when its code, the code of a fixture it uses, or a helper of the test folder that
either of them calls, names one of SLOW_NAMES (the suite's federation and CLI helpers) or holds one
of SLOW_TEXT. What static reading misses is caught while the tests run: a test not marked slow that
starts one of LAUNCHED fails, naming the command, so the fast tier never quietly grows a federation.
"""

from __future__ import annotations

import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLOW_NAMES = frozenset({
    "ZK0",  # the `zk0` command line (tests/federation.py)
    "run_zk0",  # a zk0 command, e.g. `zk0 local`
    "SuperLink", "StubFederation",  # real Flower servers on loopback (tests/loopback.py)
    "compose_stack", "ComposeStack",  # containers (tests/compose_stack.py)
    "owner",  # the fixture warm workers belong to: each such test starts real worker processes (zk0.node.warm)
})
# Programs a fast test must not start (matched in its command lines): a federation's servers, the zk0
# command (which starts them), a benchmark, a warm worker, containers.
LAUNCHED = ("flower-superlink", "flower-supernode", "zk0.cli", "zk0.bench", "zk0.node.warm", "docker")
SLOW_TEXT = LAUNCHED  # in a test's strings, or a module-level string it names (a script it runs)


def _codes(code: types.CodeType):
    """A code object and those nested in it (inner functions, lambdas, comprehensions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _strings(values):
    """The strings among `values`, those inside constant tuples (a list display of strings) included."""
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, tuple | frozenset):
            yield from _strings(value)


def starts_programs(func, seen: set | None = None) -> bool:
    """Whether `func`, or a function of the test folder it names, names a slow helper or program."""
    seen = set() if seen is None else seen
    func = getattr(func, "__wrapped__", func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen or not Path(code.co_filename).resolve().is_relative_to(HERE):
        return False
    seen.add(code)
    for part in _codes(code):
        if SLOW_NAMES & set(part.co_names):
            return True
        named = [func.__globals__.get(name) for name in part.co_names]
        if any(t in c for c in _strings([*part.co_consts, *named]) for t in SLOW_TEXT):
            return True
        if any(isinstance(v, types.FunctionType | type) and _calls_slow(v, seen) for v in named):
            return True
    return False


def _calls_slow(value, seen: set) -> bool:
    if isinstance(value, type):  # a helper class of the test folder: its methods
        return any(starts_programs(f, seen) for f in vars(value).values() if isinstance(f, types.FunctionType))
    return starts_programs(value, seen)


def is_slow(item) -> bool:
    """A collected test's tier: its own code and every fixture it uses."""
    if SLOW_NAMES & set(getattr(item, "fixturenames", ())):
        return True
    funcs = [getattr(item, "function", None)]
    for defs in item._fixtureinfo.name2fixturedefs.values():  # pytest's own record of the fixtures a test uses
        funcs += [d.func for d in defs]
    seen: set = set()
    return any(starts_programs(f, seen) for f in funcs if f is not None)


def launches(argv) -> str | None:
    """The program of LAUNCHED that a command line starts, if any."""
    text = " ".join(map(str, argv)) if isinstance(argv, list | tuple) else str(argv)
    return next((name for name in LAUNCHED if name in text), None)
