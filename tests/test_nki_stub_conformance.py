"""The interpreter's ``nl``/``nisa``/``nki`` surface and every NKI call in ``neuron_kernels/`` against the SDK's own
API stubs (aws-neuron-sdk v2.28.1, ``../shared/reference/nki-api-2.28.1/nki/api``).

Every name the interpreter offers must exist in the stubs with the same parameters and defaults (ALU operators and
activation functions, which the stub lists only in part, may instead appear in the guides' "Supported Math
Operators" / "Supported Activation Functions" tables), and every ``nl.``/``nisa.``/``nki.`` call in the kernels must
bind to the stub's signature. ``BMOJO_NKI_STUBS`` names the stub folder (default: the reference copy beside the
checkout); without it the tests skip, unless ``BMOJO_REQUIRE_REFERENCES=1`` (set by CI) makes that a failure.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import sys
from enum import Enum
from pathlib import Path
from types import ModuleType

import pytest

from neuron_kernels.interpreter import isa as interpreter_isa
from neuron_kernels.interpreter import language as interpreter_language
from neuron_kernels.interpreter import runtime as interpreter_runtime
from neuron_kernels.interpreter.operators import Operator

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_STUBS = REPOSITORY.parent / "shared" / "reference" / "nki-api-2.28.1" / "nki" / "api"
KERNEL_SOURCES = sorted(
    path
    for path in (REPOSITORY / "neuron_kernels").rglob("*.py")
    if "interpreter" not in path.relative_to(REPOSITORY).parts
)
MODULE_ALIASES = {"nl": "language", "nisa": "isa", "nki": "nki"}


def _unavailable(reason: str) -> None:
    if os.environ.get("BMOJO_REQUIRE_REFERENCES") == "1":
        pytest.fail(f"{reason}, and BMOJO_REQUIRE_REFERENCES=1 requires the reference stubs")
    pytest.skip(f"{reason}; set BMOJO_NKI_STUBS to the SDK 2.28 stub folder (nki-api-2.28.1/nki/api) to run this")


@pytest.fixture(scope="module")
def stubs() -> dict[str, ModuleType]:
    """The stub modules ``nki``, ``nki.language``, ``nki.isa``, imported without leaving them in sys.modules
    (where ``neuron_kernels.nki_compat`` would take them for the Neuron SDK)."""
    folder = Path(os.environ.get("BMOJO_NKI_STUBS", DEFAULT_STUBS))
    if not (folder / "nki" / "isa" / "__init__.py").is_file():
        _unavailable(f"no NKI API stubs at {folder}")
    try:
        importlib.import_module("ml_dtypes")
    except ImportError:
        _unavailable("ml_dtypes (imported by the stubs) is not installed")
    saved = {name: module for name, module in sys.modules.items() if name == "nki" or name.startswith("nki.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        loaded = {
            "nki": importlib.import_module("nki"),
            "language": importlib.import_module("nki.language"),
            "isa": importlib.import_module("nki.isa"),
        }
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name == "nki" or name.startswith("nki.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    assert Path(loaded["isa"].__file__).is_relative_to(folder), "imported some other nki than the stubs"
    return loaded


@pytest.fixture(scope="module")
def guide_operators() -> set[str]:
    """``nki.language`` names in the guides' operator and activation-function tables."""
    folder = Path(os.environ.get("BMOJO_NKI_STUBS", DEFAULT_STUBS))
    tables = folder.parents[1] / "guides" / "nki.api.shared.rst"
    if not tables.is_file():
        _unavailable(f"no NKI guides at {tables.parent}")
    return set(re.findall(r"``nki\.language\.([a-z_0-9]+)``", tables.read_text()))


def _default(value) -> str:
    """A comparable rendering of a default: enum members and operators by name, the rest by repr."""
    if isinstance(value, Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, Operator):
        return f"nl.{value.name}"
    if inspect.isfunction(value) or isinstance(value, type):
        return f"nl.{value.__name__}"
    return repr(value)


def _parameters(fn) -> list[tuple[str, str, str]]:
    return [
        (p.name, p.kind.name, "<required>" if p.default is inspect.Parameter.empty else _default(p.default))
        for p in inspect.signature(fn).parameters.values()
    ]


def _assert_same_surface(interpreter: ModuleType, stub: ModuleType, prefix: str, guide_operators: set[str]) -> None:
    mismatches = []
    for name in interpreter.__all__:
        ours = getattr(interpreter, name)
        theirs = getattr(stub, name, None)
        if isinstance(ours, Operator):
            if theirs is None and name not in guide_operators:
                mismatches.append(f"{prefix}.{name}: neither in the stub nor in the guides' operator tables")
            continue
        if theirs is None:
            mismatches.append(f"{prefix}.{name}: not in the stub")
        elif inspect.isfunction(ours):
            if _parameters(ours) != _parameters(theirs):
                mismatches.append(f"{prefix}.{name}: {_parameters(ours)} != stub {_parameters(theirs)}")
        elif isinstance(ours, type) and issubclass(ours, Enum):
            members = {member.name: member.value for member in ours}
            if members != {member.name: member.value for member in theirs}:
                mismatches.append(f"{prefix}.{name}: members {members} differ from the stub's")
        elif isinstance(ours, type):
            missing = [attr for attr in vars(ours) if not attr.startswith("_") and not hasattr(theirs, attr)]
            missing = [attr for attr in missing if attr not in getattr(theirs, "__annotations__", {})]
            if missing:
                mismatches.append(f"{prefix}.{name}: attributes {missing} not in the stub")
        elif ours != theirs:
            mismatches.append(f"{prefix}.{name} = {ours!r}, stub {theirs!r}")
    assert not mismatches, "\n".join(mismatches)


def test_interpreter_language_names_match_the_stubs(stubs, guide_operators):
    _assert_same_surface(interpreter_language, stubs["language"], "nl", guide_operators)


def test_interpreter_isa_names_match_the_stubs(stubs, guide_operators):
    _assert_same_surface(interpreter_isa, stubs["isa"], "nisa", guide_operators)


def test_interpreter_jit_matches_the_stub(stubs):
    assert _parameters(interpreter_runtime.jit) == _parameters(stubs["nki"].jit)


def _nki_references(path: Path):
    """(line, module alias, attribute path, call node or None) of every nl./nisa./nki. reference in a file."""
    tree = ast.parse(path.read_text())
    calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Name):
            continue
        if node.value.id in MODULE_ALIASES:
            yield node.lineno, node.value.id, node.attr, calls.get(id(node))


def test_every_nki_name_the_kernels_use_exists_and_every_call_binds_to_the_stub(stubs, guide_operators):
    problems, calls = [], 0
    for path in KERNEL_SOURCES:
        for line, alias, attr, call in _nki_references(path):
            where = f"{path.relative_to(REPOSITORY)}:{line}: {alias}.{attr}"
            stub_module = stubs[MODULE_ALIASES[alias]]
            target = getattr(stub_module, attr, None)
            if target is None:
                if not (alias == "nl" and attr in guide_operators):
                    problems.append(f"{where} is not in the stub")
                continue
            if call is None or not callable(target) or isinstance(target, type):
                continue
            if any(isinstance(arg, ast.Starred) for arg in call.args) or any(k.arg is None for k in call.keywords):
                problems.append(f"{where}: *args/**kwargs calls cannot be checked")
                continue
            calls += 1
            try:
                inspect.signature(target).bind(*call.args, **{keyword.arg: keyword.value for keyword in call.keywords})
            except TypeError as error:
                problems.append(f"{where}(...) does not bind to the stub signature: {error}")
    assert not problems, "\n".join(problems)
    assert calls > 20, "the kernel sources should make many NKI calls; is KERNEL_SOURCES right?"
