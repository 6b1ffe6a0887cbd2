"""TensorRT's real Python API surface, read from the ``tensorrt-stubs`` package (type stubs of
TensorRT 10.13, no CUDA needed), and two checks against it:

* ``stand_in_problems``: every attribute and method a stand-in ``tensorrt`` module used by the
  tests offers exists in the real API (classes the stand-in returns are matched to the real
  ones through the stubs' return annotations: ``Builder.create_builder_config -> IBuilderConfig``);
* ``package_problems``: every ``trt.`` use in hypermerge's TensorRT code (attributes, methods of
  the objects it gets back, keyword argument names, ``hasattr``/``getattr`` probes) exists.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import inspect
import re
import textwrap
import types
from pathlib import Path

MODULE = "module"


@dataclasses.dataclass
class StubClass:
    name: str
    bases: list[str]
    members: dict[str, set[str] | None]  # method -> parameter names; attribute -> None
    returns: dict[str, str]  # method -> the stub class it returns (when it returns one)


class StubIndex:
    """The classes and module-level names of the ``tensorrt`` stubs."""

    def __init__(self, classes: dict[str, StubClass], names: set[str]):
        self.classes, self.names = classes, names

    @classmethod
    def load(cls) -> StubIndex:
        files = {str(f): f for f in importlib.metadata.files("tensorrt-stubs") or []}
        bindings = Path(files["tensorrt_bindings/tensorrt.pyi"].locate())
        package = Path(files["tensorrt/__init__.pyi"].locate())
        tree = _parse_leniently(bindings.read_text())
        classes = {node.name: _stub_class(node) for node in tree.body if isinstance(node, ast.ClassDef)}
        names = set(classes)
        for node in ast.parse(package.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                names |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for stub in classes.values():  # resolve return annotations to known classes
            stub.returns = {m: r for m, r in ((m, _class_in(r, classes)) for m, r in stub.returns.items()) if r}
        return cls(classes, names)

    def member(self, class_name: str, attr: str) -> tuple[bool, set[str] | None]:
        """(exists, parameter names if a method), looking through base classes."""
        pending, seen = [class_name], set()
        while pending:
            name = pending.pop()
            stub = self.classes.get(name)
            if stub is None or name in seen:
                continue
            seen.add(name)
            if attr in stub.members:
                return True, stub.members[attr]
            pending += stub.bases
        return False, None

    def returns(self, class_name: str, method: str) -> str | None:
        pending = [class_name]
        while pending:
            stub = self.classes.get(pending.pop())
            if stub is None:
                continue
            if method in stub.returns:
                return stub.returns[method]
            pending += stub.bases
        return None


def _parse_leniently(text: str) -> ast.Module:
    """Parse the stubs. A few generated signatures are not valid Python (a parameter without a
    default after one with a default, a parameter named ``in``): those lines are repaired (defaults
    dropped, the keyword renamed ``in_``), which keeps every method and attribute name."""
    lines = text.splitlines()
    for _ in range(200):
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as exc:
            if exc.lineno is None:
                raise
            line = lines[exc.lineno - 1]
            if "default argument" in str(exc.msg):
                fixed = re.sub(r"\s*=\s*(None|\.\.\.|[\w.]+)(?=\s*[,)])", "", line)
            else:  # a Python keyword as a parameter name (``in``): renamed, the method kept
                fixed = re.sub(r"([(,]\s*)(in|from|is|lambda|pass|global)(\s*:)", r"\1\2_\3", line)
            if fixed == line:
                raise
            lines[exc.lineno - 1] = fixed
    raise SyntaxError("too many invalid signatures in the TensorRT stubs")


def _stub_class(node: ast.ClassDef) -> StubClass:
    members: dict[str, set[str] | None] = {}
    returns: dict[str, str] = {}
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            params = {a.arg for a in item.args.args[1:] + item.args.kwonlyargs + item.args.posonlyargs}
            members[item.name] = (members.get(item.name) or set()) | params
            if item.returns is not None:
                returns.setdefault(item.name, ast.unparse(item.returns))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members[item.target.id] = None
        elif isinstance(item, ast.Assign):
            members.update({t.id: None for t in item.targets if isinstance(t, ast.Name)})
        elif isinstance(item, ast.ClassDef):
            members[item.name] = None
    bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
    return StubClass(node.name, bases, members, returns)


def _class_in(annotation: str, classes: dict) -> str | None:
    for word in re.findall(r"[A-Za-z_]\w*", annotation):
        if word in classes:
            return word
    return None


# -- stand-in modules ---------------------------------------------------------------------------
def stand_in_problems(module, index: StubIndex) -> tuple[list[str], int]:
    """Names the stand-in offers that the real API lacks, and how many names were checked."""
    problems: list[str] = []
    checked = 0
    seen: set[type] = set()

    def check_class(cls: type, stub: str) -> None:
        nonlocal checked
        if cls in seen:
            return
        seen.add(cls)
        for attr, value in vars(cls).items():
            if attr.startswith("__"):
                continue
            checked += 1
            if not index.member(stub, attr)[0]:
                problems.append(f"{stub}.{attr}")
                continue
            if inspect.isfunction(value):
                for returned in _returned_classes(value):
                    target = index.returns(stub, attr)
                    if target is None:
                        problems.append(f"{stub}.{attr} returns a stand-in class, but returns no TensorRT class")
                    else:
                        check_class(returned, target)

    namespace = vars(module) if isinstance(module, types.SimpleNamespace) else dict(vars(module))
    for name, value in namespace.items():
        if name.startswith("__") and name != "__version__":
            continue
        checked += 1
        if name not in index.names:
            problems.append(f"tensorrt.{name}")
            continue
        if isinstance(value, types.SimpleNamespace):  # an enum: its values
            for attr in vars(value):
                checked += 1
                if not index.member(name, attr)[0]:
                    problems.append(f"{name}.{attr}")
        elif inspect.isclass(value):
            check_class(value, name)
    return problems, checked


def _returned_classes(function) -> list[type]:
    """Classes a stand-in method constructs in its return statements (found through its closure)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return []
    cells = dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__ or ()),
                     strict=True))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None:
            for call in ast.walk(node.value):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                    value = cells.get(call.func.id, function.__globals__.get(call.func.id))
                    if inspect.isclass(value):
                        found.append(value)
    return found


# -- hypermerge's own uses ----------------------------------------------------------------------
class _UseChecker:
    """Walks a module's source in order, typing names as they are assigned (``trt`` / ``self.trt``
    is the module; constructors and the stubs' return annotations type the rest) and checking every
    ``trt`` use it can type against the stubs."""

    def __init__(self, index: StubIndex):
        self.index = index
        self.env: dict[str, str] = {"trt": MODULE, "self.trt": MODULE}
        self.problems: list[str] = []
        self.uses: list[str] = []

    @staticmethod
    def key(node) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        return None

    def type_of(self, node) -> str | None:
        name = self.key(node)
        if name is not None and name in self.env:
            return self.env[name]
        if isinstance(node, ast.Attribute):
            base = self.type_of(node.value)
            if base == MODULE:
                return f"class:{node.attr}" if node.attr in self.index.classes else None
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                base = self.type_of(func.value)
                if base == MODULE and func.attr in self.index.classes:
                    return func.attr  # a constructor
                if base is not None and base != MODULE:
                    return self.index.returns(base.removeprefix("class:"), func.attr)
        return None

    def check(self, base: str, attr: str, keywords: list[str] = ()) -> None:
        where = "tensorrt" if base == MODULE else base.removeprefix("class:")
        self.uses.append(f"{where}.{attr}")
        if base == MODULE:
            if attr not in self.index.names:
                self.problems.append(f"tensorrt.{attr}")
            return
        exists, params = self.index.member(where, attr)
        if not exists:
            self.problems.append(f"{where}.{attr}")
        for keyword in keywords:
            if params is not None and keyword not in params:
                self.problems.append(f"{where}.{attr}(... {keyword}=...)")

    def visit(self, node) -> None:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and self.key(node.targets[0]) is not None:
            inferred = self.type_of(node.value)
            if inferred is not None:
                self.env[self.key(node.targets[0])] = inferred
        elif isinstance(node, ast.Attribute):
            base = self.type_of(node.value)
            if base is not None and self.key(node) not in self.env:
                self.check(base, node.attr)
        elif isinstance(node, ast.Call):
            self.visit_call(node)

    def visit_call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute):
            base = self.type_of(node.func.value)
            if base is not None and base != MODULE and node.keywords:
                self.check(base, node.func.attr, [k.arg for k in node.keywords if k.arg])
        if isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2:
            base = self.type_of(node.args[0])
            if base is not None and isinstance(node.args[1], ast.Constant):
                self.check(base, node.args[1].value)


def package_problems(source: str, index: StubIndex) -> tuple[list[str], list[str]]:
    """Every ``trt.`` use in ``source`` that the real API lacks, and every use checked.

    Types flow from the module (``trt`` / ``self.trt``) through constructors and the stubs'
    return annotations into variables (``config = builder.create_builder_config()``).
    """
    checker = _UseChecker(index)
    tree = ast.parse(source)
    # in source order: a variable is typed by the assignment above its uses
    for node in sorted((n for n in ast.walk(tree) if hasattr(n, "lineno")), key=lambda n: (n.lineno, n.col_offset)):
        checker.visit(node)
    return checker.problems, checker.uses
