"""mypyc's typing traps in the compiled modules: one local name, one type, for the whole function.

mypyc gives every local variable of a compiled function one type, from its first binding.
mypy lets each ``except E as name`` clause (and each ``with ... as name``) bind its own type,
so a second clause of another type compiles to a type check that raises ``TypeError`` when
the clause is entered: ``_Connection.run`` once typed ``exc`` by ``except RemoteProtocolError``
and so crashed on the ``IncompleteReadError`` of every abrupt disconnect. Rebinding a ``for``
target with another type is caught by mypy itself (an incompatible assignment); these two
forms are not, so the rule here is simple: a name bound by ``except ... as`` or ``with ... as``
in a compiled function is bound nowhere else in that function, not even as a parameter.

A sibling: compiled, ``isinstance(x, C)`` for a class ``C`` declared
``@mypyc_attr(native_class=False)`` (the exceptions: OSError subclasses cannot be native) checks
the exact type and the subclasses mypyc compiled, never a subclass defined in interpreted code
(:class:`device.block.locks.ImageInUseError` is a ``BlockError`` isinstance would miss). Compiled
code asks ``issubclass(type(x), C)``, which asks Python.
"""

from __future__ import annotations

import ast
import collections
import textwrap

from tests.build import REPO, compiled_sources


class _Bindings(ast.NodeVisitor):
    """Every name a function's own body binds (not nested functions, classes or lambdas)."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)

    _SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.comprehension)

    def visit(self, node: ast.AST) -> None:
        if not isinstance(node, self._SCOPES):  # another scope (comprehensions: their own too)
            super().visit(node)

    def _store(self, target: ast.AST, kind: str) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.by_name[node.id].append((kind, node.lineno))

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.by_name[node.name].append(("except", node.lineno))
        self.generic_visit(node)

    def visit_With(self, node: ast.With) -> None:
        self._with(node)

    def visit_AsyncWith(self, node: ast.AsyncWith) -> None:
        self._with(node)

    def _with(self, node: ast.With | ast.AsyncWith) -> None:
        for item in node.items:
            if item.optional_vars is not None:
                self._store(item.optional_vars, "with")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self.by_name[node.id].append(("assign", node.lineno))

    def visit_withitem(self, node: ast.withitem) -> None:
        self.visit(node.context_expr)  # optional_vars were recorded as "with" already


def traps(source: str, filename: str = "<source>") -> list[str]:
    """Each name bound by ``except``/``with ... as`` and again elsewhere in the same function."""
    found = []
    for function in ast.walk(ast.parse(source, filename)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        bindings = _Bindings()
        arguments = function.args
        for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
            bindings.by_name[argument.arg].append(("parameter", function.lineno))
        for statement in function.body:
            bindings.visit(statement)
        for name, binds in bindings.by_name.items():
            if len(binds) > 1 and any(kind in ("except", "with") for kind, _ in binds):
                lines = ", ".join(f"{kind}@{line}" for kind, line in binds)
                found.append(f"{filename}:{function.lineno} {function.name}(): {name!r} bound by {lines}")
    return found


def test_compiled_functions_bind_except_and_with_names_once() -> None:
    found = []
    for source in compiled_sources():
        found += traps(source.read_text(), str(source.relative_to(REPO)))
    assert found == []


def test_the_check_catches_each_form() -> None:
    two_excepts = """
        async def run():
            try:
                pass
            except RemoteProtocolError as exc:
                log(exc)
            except (ConnectionError, IncompleteReadError) as exc:
                log(exc)
    """
    nested = """
        def recover():
            try:
                try:
                    pass
                except TransportError as exc:
                    pass
            except Exception as exc:
                raise
    """
    with_then_assign = """
        def f():
            with open("a") as handle:
                pass
            handle = other()
    """
    fine = """
        def f():
            try:
                pass
            except ValueError as bad_value:
                pass
            except KeyError as missing:
                pass
            with a() as first, b() as second:
                pass
            def inner(exc):
                try:
                    pass
                except OSError as failed:
                    pass
    """
    parameter = """
        def f(exc: BaseException):
            try:
                pass
            except OSError as exc:
                pass
    """
    assert len(traps(textwrap.dedent(two_excepts))) == 1
    assert len(traps(textwrap.dedent(nested))) == 1
    assert len(traps(textwrap.dedent(with_then_assign))) == 1
    assert len(traps(textwrap.dedent(parameter))) == 1
    assert traps(textwrap.dedent(fine)) == []


def _non_native_classes(sources: list[tuple[str, str]]) -> set[str]:
    """Classes declared ``native_class=False`` in compiled modules, and their compiled subclasses."""
    found: set[str] = set()
    classes: list[ast.ClassDef] = []
    for source, filename in sources:
        classes += [n for n in ast.walk(ast.parse(source, filename)) if isinstance(n, ast.ClassDef)]
    for node in classes:
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and any(
                k.arg == "native_class" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in decorator.keywords
            ):
                found.add(node.name)
    changed = True
    while changed:  # a subclass of a non-native class is not native either
        changed = False
        for node in classes:
            bases = {
                b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                for b in node.bases
            }
            if node.name not in found and bases & found:
                found.add(node.name)
                changed = True
    return found


def isinstance_traps(source: str, non_native: set[str], filename: str = "<source>") -> list[str]:
    """Each ``isinstance(x, C)`` (or a tuple holding ``C``) for a non-native compiled class ``C``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
        ):
            continue
        if len(node.args) != 2:
            continue
        target = node.args[1]
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        for name in names:
            text = (
                name.id
                if isinstance(name, ast.Name)
                else name.attr
                if isinstance(name, ast.Attribute)
                else ""
            )
            if text in non_native:
                found.append(f"{filename}:{node.lineno}: isinstance(..., {text})")
    return found


def test_compiled_code_does_not_isinstance_non_native_classes() -> None:
    sources = [(source.read_text(), str(source.relative_to(REPO))) for source in compiled_sources()]
    non_native = _non_native_classes(sources)
    assert {"BlockError", "BlkError", "BlkUnsupportedError"} <= non_native
    found = []
    for text, filename in sources:
        found += isinstance_traps(text, non_native, filename)
    assert found == []


def test_the_isinstance_check_catches_it() -> None:
    source = textwrap.dedent(
        """
        @mypyc_attr(native_class=False)
        class Base(OSError):
            pass

        class Leaf(Base):
            pass

        def kind(exc):
            return isinstance(exc, (ValueError, Leaf)), issubclass(type(exc), Base)
        """
    )
    non_native = _non_native_classes([(source, "<source>")])
    assert non_native == {"Base", "Leaf"}
    assert len(isinstance_traps(source, non_native)) == 1
