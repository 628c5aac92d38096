"""The interpreter's NKI front end: the Python subset the SDK 2.28 (Beta 2) compiler accepts in a kernel.

The real compiler parses a kernel and every function it calls with its own front end, so a kernel that
runs as ordinary Python may still not compile. :func:`check_kernel` reads the source of a kernel and of
every helper, class and method it reaches, and raises :class:`NkiLanguageError` naming the rule, the guide
section it comes from (``../shared/reference/nki-api-2.28.1/guides/``) and the offending line. It checks:

- no comprehensions or generator expressions, lambdas, ``try``, ``with``, ``yield``, ``global`` or
  ``nonlocal`` (the Language Guide's "NKI Values" and "Control Flow" describe the whole language);
- only the built-ins the guides use (``range``, ``len``, ``min``, ``slice``, ``print``, ``dict``) and ``max``:
  no ``enumerate``, ``zip``, ``list(...)``, ...;
- no nested slicing ``t[i][j]`` (Migration Guide);
- dictionary displays with string keys only (Migration Guide);
- every class used inherits ``nl.NKIObject`` and nothing else (Language Guide, "Class Support");
- no ``@nki.jit`` sub-kernels (Migration Guide, "Remove nki.jit decorator on sub-kernels");
- no Python list indexed by the variable of an ``affine_range``/``sequential_range`` loop: those loops are
  kept as device loops (their API entries), so the index is a runtime value.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types
from dataclasses import dataclass

from neuron_kernels.interpreter.errors import NkiLanguageError

LANGUAGE_GUIDE = "NKI Language Guide"
MIGRATION_GUIDE = "NKI Migration Guide from Beta 1 to Beta 2"
NOT_AVAILABLE = "What features in neuronxcc.nki.* are not available in nki.*?"

# Built-ins the guides show inside kernels (range, len, min, slice, print, dict), and max beside min.
ALLOWED_BUILTINS = frozenset({"range", "len", "min", "max", "slice", "print", "dict"})
DEVICE_LOOPS = frozenset({"affine_range", "sequential_range"})
INTERPRETER_PACKAGE = "neuron_kernels.interpreter"


@dataclass(frozen=True)
class Rule:
    """One restriction of the NKI language and where the 2.28 guides state it."""

    summary: str
    guide: str
    section: str


COMPREHENSION = Rule(
    "comprehensions and generator expressions are not NKI; build the list with a for-loop and append",
    LANGUAGE_GUIDE,
    "NKI Values / Control Flow",
)
UNSUPPORTED_STATEMENT = Rule(
    "this Python construct is not part of the NKI language", LANGUAGE_GUIDE, "NKI Values / Control Flow"
)
BUILTIN = Rule("this Python built-in is not available in NKI kernels", LANGUAGE_GUIDE, "Control Flow")
NESTED_SLICING = Rule("nested slicing (t[i][j]) is not available; index once: t[i, j]", MIGRATION_GUIDE, NOT_AVAILABLE)
DICT_KEYS = Rule("dictionaries support only string keys", MIGRATION_GUIDE, NOT_AVAILABLE)
CLASS_BASE = Rule(
    "classes used in a kernel must inherit nl.NKIObject and no other class", LANGUAGE_GUIDE, "Class Support"
)
SUB_KERNEL = Rule(
    "a kernel must not call another @nki.jit kernel; remove the decorator from the sub-kernel",
    MIGRATION_GUIDE,
    "Remove nki.jit decorator on sub-kernels",
)
LIST_BY_LOOP_INDEX = Rule(
    "a Python list cannot be indexed by an affine_range/sequential_range index, which is a runtime value "
    "(the loop is not unrolled); keep the items in one tensor and slice it",
    LANGUAGE_GUIDE,
    "Dynamic Control Flow",
)

_FORBIDDEN_NODES = {
    ast.ListComp: COMPREHENSION,
    ast.SetComp: COMPREHENSION,
    ast.DictComp: COMPREHENSION,
    ast.GeneratorExp: COMPREHENSION,
    ast.Lambda: UNSUPPORTED_STATEMENT,
    ast.Try: UNSUPPORTED_STATEMENT,
    ast.With: UNSUPPORTED_STATEMENT,
    ast.Yield: UNSUPPORTED_STATEMENT,
    ast.YieldFrom: UNSUPPORTED_STATEMENT,
    ast.Global: UNSUPPORTED_STATEMENT,
    ast.Nonlocal: UNSUPPORTED_STATEMENT,
}
_CONSTRUCT_NAMES = {
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.Lambda: "lambda",
    ast.Try: "try statement",
    ast.With: "with statement",
    ast.Yield: "yield",
    ast.YieldFrom: "yield from",
    ast.Global: "global statement",
    ast.Nonlocal: "nonlocal statement",
}

_checked: set[types.CodeType] = set()


def check_kernel(fn: types.FunctionType) -> None:
    """Raise :class:`NkiLanguageError` unless ``fn`` and everything it calls is in the NKI language."""
    if fn.__code__ in _checked:
        return
    pending: list[tuple[types.FunctionType, type | None]] = [(fn, None)]
    seen: set[types.CodeType] = set()
    while pending:
        function, owner = pending.pop()
        if function.__code__ in seen:
            continue
        seen.add(function.__code__)
        pending.extend(_FunctionChecker(function, owner).run())
    _checked.update(seen)


class _FunctionChecker(ast.NodeVisitor):
    """Checks one function's body and lists the Python functions (and their classes) it calls."""

    def __init__(self, fn: types.FunctionType, owner: type | None) -> None:
        self.fn, self.owner = fn, owner
        lines, self.first_line = inspect.getsourcelines(fn)
        self.path = inspect.getsourcefile(fn) or "<unknown>"
        self.tree = ast.parse(textwrap.dedent("".join(lines)))
        self.locals = _assigned_names(self.tree)
        self.lists = _list_names(self.tree)
        self.device_loop_indices: list[set[str]] = []
        self.callees: list[tuple[types.FunctionType, type | None]] = []

    def run(self) -> list[tuple[types.FunctionType, type | None]]:
        function_node = self.tree.body[0]
        for statement in function_node.body:
            self.visit(statement)
        return self.callees

    def fail(self, node: ast.AST, rule: Rule, detail: str) -> None:
        line = self.first_line + getattr(node, "lineno", 1) - 1
        raise NkiLanguageError(
            f"{self.path}:{line}: in {self.fn.__qualname__}: {detail}: {rule.summary} "
            f"({rule.guide}, section '{rule.section}')"
        )

    def generic_visit(self, node: ast.AST) -> None:
        rule = _FORBIDDEN_NODES.get(type(node))
        if rule is not None:
            self.fail(node, rule, _CONSTRUCT_NAMES[type(node)])
        super().generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # noqa: N802  (ast visitor name)
        self.fail(node, UNSUPPORTED_STATEMENT, f"nested function {node.name!r}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:  # noqa: N802
        self.fail(node, UNSUPPORTED_STATEMENT, f"class {node.name!r} defined inside a kernel function")

    def visit_Subscript(self, node: ast.Subscript) -> None:  # noqa: N802
        if isinstance(node.value, ast.Subscript):
            self.fail(node, NESTED_SLICING, f"{ast.unparse(node)}")
        if isinstance(node.value, ast.Name) and node.value.id in self.lists:
            used = {n.id for n in ast.walk(node.slice) if isinstance(n, ast.Name)}
            loop_indices = set().union(*self.device_loop_indices) if self.device_loop_indices else set()
            if used & loop_indices:
                self.fail(node, LIST_BY_LOOP_INDEX, f"{ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:  # noqa: N802
        for key in node.keys:
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                self.fail(node, DICT_KEYS, f"key {ast.unparse(key) if key is not None else '**'}")
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:  # noqa: N802
        device_loop = isinstance(node.iter, ast.Call) and _called_name(node.iter.func) in DEVICE_LOOPS
        if device_loop:
            self.device_loop_indices.append({n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)})
        self.generic_visit(node)
        if device_loop:
            self.device_loop_indices.pop()

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        target = self._resolve(node.func)
        if target is not None:
            self._check_callee(node, target)
        self.generic_visit(node)

    def _resolve(self, func: ast.expr):
        """The object a called expression names at module level, or None when it is a runtime value."""
        if isinstance(func, ast.Name):
            if func.id in self.locals:
                return None
            closure = inspect.getclosurevars(self.fn).nonlocals
            for namespace in (closure, self.fn.__globals__, vars(builtins)):
                if func.id in namespace:
                    return namespace[func.id]
            return None
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id == "self" and self.owner is not None:
                method = inspect.getattr_static(self.owner, func.attr, None)
                return method if isinstance(method, types.FunctionType) else None
            base = self._resolve_value(func.value)
            if base is None:
                return None
            return getattr(base, func.attr, None)
        return None

    def _resolve_value(self, node: ast.expr):
        if isinstance(node, ast.Name):
            if node.id in self.locals:
                return None
            return self.fn.__globals__.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._resolve_value(node.value)
            return None if base is None else getattr(base, node.attr, None)
        return None

    def _check_callee(self, node: ast.Call, target) -> None:
        from neuron_kernels.interpreter.runtime import InterpretedKernel

        if isinstance(target, InterpretedKernel):
            self.fail(node, SUB_KERNEL, f"call of {target.fn.__name__}")
        module = getattr(target, "__module__", None) or ""
        if module == "builtins":
            name = getattr(target, "__name__", "?")
            if name not in ALLOWED_BUILTINS:
                self.fail(node, BUILTIN, f"{name}(...)")
            return
        if module.startswith(INTERPRETER_PACKAGE):
            return  # nl./nisa./nki. names: held against the SDK stubs by the conformance test
        if isinstance(target, type):
            from neuron_kernels.interpreter.language import NKIObject

            if target.__bases__ != (NKIObject,):
                bases = ", ".join(base.__name__ for base in target.__bases__)
                self.fail(node, CLASS_BASE, f"class {target.__name__}({bases})")
            for member in vars(target).values():
                if isinstance(member, types.FunctionType):
                    self.callees.append((member, target))
            return
        if isinstance(target, types.MethodType):
            target = target.__func__
        if isinstance(target, types.FunctionType):
            self.callees.append((target, None))


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _assigned_names(tree: ast.Module) -> set[str]:
    """Parameters and every name the function binds (these are runtime values, not module functions)."""
    function_node = tree.body[0]
    names = {arg.arg for arg in ast.walk(function_node.args) if isinstance(arg, ast.arg)}
    for node in ast.walk(function_node):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _list_names(tree: ast.Module) -> set[str]:
    """Names the function binds to a list display (``[...]``)."""
    names = set()
    for node in ast.walk(tree.body[0]):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names
