"""Check the package's layout limits (issue 18) by reading its source; nothing is imported.

    python scripts/check_layout.py            # checks loralab/ next to this script's folder
    python scripts/check_layout.py PKG_DIR    # any package directory

Prints the largest module, the longest function and every offender, then exits 1 if a limit
is broken, else 0. The limits (`LIMITS`) and the layer table (`LAYERS`) are data below.

- A module has at most 600 lines and a function at most 150 (from `def` to its last line,
  nested functions included in their parent's length and also counted on their own).
- No import cycles among the package's modules. The graph has an edge A -> B for every
  import A executes when it is imported: module-level imports, `TYPE_CHECKING` blocks excluded
  (they never run), imports inside functions excluded (they run later). `from P import name`
  points at the module `P.name` when there is one, else at `P` (its `__init__`).
- At most 5 imports of the package's own modules inside functions. `importlib.import_module`
  and `__import__` calls count too: a literal argument counts when it names the package
  (`"loralab.cli.train"`, `".train"`); a computed one counts when its module names one of the
  package's modules in a string literal (`"loralab.training.strategies"`), since the call may
  then load it. Optional third-party libraries imported lazily are not counted.
- Imports point down the layer order: a module may import its own top-level package (or
  foundation module) and lower layers, never a higher one. Every runtime import is checked,
  in functions too (an upward import hidden in a function is still an upward dependency);
  `TYPE_CHECKING` imports are not (they are annotations only). A module whose top-level name
  is not in the table is a violation too, so the table stays complete.
- The torch-free modules (`TORCH_FREE`) must not import torch or transformers when imported,
  directly or through the package's modules they import (parent packages' `__init__` included,
  since Python runs them first). The command line reads them to build its choices and help.

Only the standard library is used, so this runs before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("errors", "progress", "devices", "bundled")),
    ("models", ("models",)),
    ("data", ("data",)),
    # the package root (`loralab/__init__.py`) is the public API: it re-exports lora's names
    ("lora", ("lora", "__init__")),
    ("quant", ("quant",)),
    ("kernels", ("kernels",)),
    ("costs", ("costs",)),
    ("scoring", ("scoring",)),
    ("training", ("training",)),
    ("results", ("results",)),
    ("study", ("study",)),
    ("report", ("report",)),
    ("cli", ("cli", "__main__")),
)
"""The layer order, lowest first: (layer name, top-level names in it). A top-level name is a
sub-package (`models` for `loralab/models/`), a module (`errors` for `loralab/errors.py`),
`__init__` for the package root or `__main__`."""

TORCH_FREE: tuple[str, ...] = (
    "training.config",
    "training.strategies.registry",
)
"""Modules (relative to the package) that must import neither torch nor transformers: the
command line reads them to build its choices and help without starting torch."""

HEAVY: tuple[str, ...] = ("torch", "transformers")
"""Third-party packages a torch-free module must not reach."""


@dataclass(frozen=True)
class Limits:
    """The limits a layout must keep."""

    module_lines: int = 600
    function_lines: int = 150
    infunction_imports: int = 5
    cycles: int = 0


LIMITS = Limits()


@dataclass(frozen=True)
class Function:
    """One `def` (methods and nested functions included)."""

    path: str
    lineno: int
    qualname: str
    lines: int

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno} {self.qualname} ({self.lines} lines)"


@dataclass(frozen=True)
class Import:
    """One import of a package module. `target` is a module of the package."""

    importer: str
    path: str
    lineno: int
    target: str
    in_function: bool
    type_checking: bool
    dynamic: bool = False  # importlib.import_module / __import__

    def __str__(self) -> str:
        how = " (import_module)" if self.dynamic else ""
        return f"{self.path}:{self.lineno} {self.importer} -> {self.target}{how}"


@dataclass
class Layout:
    """What the checks need to know about a package, read from its source."""

    root: str
    modules: dict[str, str] = field(default_factory=dict)  # name -> path
    module_lines: dict[str, int] = field(default_factory=dict)
    functions: list[Function] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)
    # module -> top-level third-party names it imports at module level (TYPE_CHECKING excluded)
    external: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    syntax_errors: list[str] = field(default_factory=list)

    def graph(self) -> dict[str, set[str]]:
        """Module-level runtime import edges among the package's modules (self-edges dropped)."""
        edges: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            if (not imp.in_function and not imp.type_checking and imp.target != imp.importer
                    and imp.target in self.modules):
                edges[imp.importer].add(imp.target)
        return edges


# --------------------------------------------------------------------------- reading the source
def module_name(package_dir: Path, path: Path) -> str:
    """`loralab/training/loop.py` -> `loralab.training.loop`; `__init__.py` names its package."""
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def _literal_prefix(node: ast.expr) -> str | None:
    """The known leading text of a str literal or f-string, None when it is computed."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


class _ModuleReader:
    """Collects one module's functions and imports in a single walk of its syntax tree."""

    def __init__(self, layout: Layout, name: str, path: str, is_package: bool) -> None:
        self.layout = layout
        self.name = name
        self.path = path
        self.package = name if is_package else name.rpartition(".")[0]
        self.names_own_module = False

    def resolve(self, module: str) -> str | None:
        """The longest prefix of dotted `module` that is a module of the package, if any."""
        parts = module.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in self.layout.modules:
                return candidate
            parts.pop()
        return None

    def absolute(self, level: int, module: str | None) -> str:
        base = self.package.split(".")
        if level > 1:
            base = base[: len(base) - level + 1]
        return ".".join(base + ([module] if module else []))

    def targets(self, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
        """The package modules an import statement loads (third-party names recorded aside)."""
        root = self.layout.root
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    resolved = self.resolve(alias.name)
                    if resolved:
                        yield resolved
            return
        base = self.absolute(node.level, node.module) if node.level else (node.module or "")
        if base.split(".")[0] != root:
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            resolved = submodule if submodule in self.layout.modules else self.resolve(base)
            if resolved:
                yield resolved

    def external(self, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif not node.level and node.module:
            yield node.module.split(".")[0]

    def dynamic_target(self, call: ast.Call) -> str | None:
        """What an import_module / __import__ call may load of the package, else None."""
        if not call.args:
            return None
        prefix = _literal_prefix(call.args[0])
        if prefix is None:  # computed: possibly the package's, if the module names its modules
            return "<computed>" if self.names_own_module else None
        if prefix.startswith("."):
            package = call.args[1] if len(call.args) > 1 else None
            base = _literal_prefix(package) if package is not None else None
            prefix = (base or self.package) + prefix
        if prefix.split(".")[0] != self.layout.root:
            return None
        return self.resolve(prefix.rstrip(".")) or self.layout.root

    def scan_strings(self, tree: ast.Module) -> None:
        """Does any string literal name a module of the package (`"pkg.sub.mod:Class"`)?"""
        pattern = re.compile(rf"^{re.escape(self.layout.root)}(\.\w+)+(:\w+)?$")
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value.partition(":")[0]
                if pattern.match(node.value) and text in self.layout.modules:
                    self.names_own_module = True
                    return

    def visit(self, node: ast.AST, scope: Sequence[str], in_function: bool,
              type_checking: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            qualname = ".".join([*scope, node.name])
            self.layout.functions.append(
                Function(self.path, node.lineno, qualname, node.end_lineno - node.lineno + 1))
            for child in node.body:
                self.visit(child, [*scope, node.name], True, type_checking)
            for expr in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
                if expr is not None:
                    self.visit(expr, scope, in_function, type_checking)
            return
        if isinstance(node, ast.Lambda):  # its body runs when called, like a function's
            self.visit(node.body, scope, True, type_checking)
            for default in [*node.args.defaults, *node.args.kw_defaults]:
                if default is not None:
                    self.visit(default, scope, in_function, type_checking)
            return
        if isinstance(node, ast.ClassDef):
            for part in ast.iter_child_nodes(node):
                self.visit(part, [*scope, node.name], in_function, type_checking)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                self.visit(child, scope, in_function, True)
            for child in node.orelse:
                self.visit(child, scope, in_function, type_checking)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for module in self.targets(node):
                self.layout.imports.append(Import(self.name, self.path, node.lineno, module,
                                                  in_function, type_checking))
            if not in_function and not type_checking:
                self.layout.external[self.name].update(self.external(node))
            return
        if isinstance(node, ast.Call) and _is_dynamic_import(node):
            target = self.dynamic_target(node)
            if target is not None:
                self.layout.imports.append(Import(self.name, self.path, node.lineno, target,
                                                  in_function, type_checking, dynamic=True))
        for sub in ast.iter_child_nodes(node):
            self.visit(sub, scope, in_function, type_checking)


def read_layout(package_dir: Path | str, display_root: Path | None = None) -> Layout:
    """Read every `.py` file under `package_dir` (a package directory such as `loralab/`).

    Paths in the result are relative to `display_root` (default: the package's parent).
    """
    package_dir = Path(package_dir).resolve()
    display_root = (display_root or package_dir.parent).resolve()
    layout = Layout(root=package_dir.name)
    files = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
    for path in files:
        layout.modules[module_name(package_dir, path)] = path.relative_to(display_root).as_posix()
    for path in files:
        name = module_name(package_dir, path)
        shown = layout.modules[name]
        source = path.read_text(encoding="utf-8")
        layout.module_lines[name] = len(source.splitlines())
        try:
            tree = ast.parse(source, filename=shown)
        except SyntaxError as err:
            layout.syntax_errors.append(f"{shown}:{err.lineno} {err.msg}")
            continue
        reader = _ModuleReader(layout, name, shown, path.name == "__init__.py")
        reader.scan_strings(tree)
        for node in tree.body:
            reader.visit(node, [], False, False)
    return layout


# --------------------------------------------------------------------------- the checks
def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module.

    Tarjan's algorithm (iterative, so deep graphs do not hit the recursion limit) finds the
    components; a breadth-first search inside each gives a readable cycle `a -> b -> a`.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_shortest_cycle(graph, set(c)) for c in sorted(components)]


def _shortest_cycle(graph: Mapping[str, Iterable[str]], members: set[str]) -> list[str]:
    start = min(members)
    parents: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph.get(node, ())):
            if succ not in members:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if succ not in parents:
                parents[succ] = node
                queue.append(succ)
    return sorted(members)  # unreachable for a strongly connected component


def layer_of(module: str, root: str,
             layers: Sequence[tuple[str, Sequence[str]]] = LAYERS) -> tuple[int, str] | None:
    """(layer index, layer name) of a module, from its top-level name; None if not listed."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, (layer, members) in enumerate(layers):
        if top in members:
            return i, layer
    return None


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(layout: Layout,
                     layers: Sequence[tuple[str, Sequence[str]]] = LAYERS) -> list[str]:
    """Runtime imports of a higher layer, and modules whose top-level name has no layer."""
    problems = [f"{layout.modules[m]}: {m} is in no layer (add '{_top(m)}' to LAYERS)"
                for m in sorted(layout.modules) if layer_of(m, layout.root, layers) is None]
    for imp in layout.imports:
        if (imp.type_checking or imp.target not in layout.modules
                or _top(imp.importer) == _top(imp.target)):
            continue
        here = layer_of(imp.importer, layout.root, layers)
        there = layer_of(imp.target, layout.root, layers)
        if here is None or there is None:
            continue
        if there[0] > here[0]:
            where = " (in a function)" if imp.in_function else ""
            problems.append(f"{imp}{where}: layer {here[0]} {here[1]} imports layer "
                            f"{there[0]} {there[1]}")
    return problems


def runtime_closure(layout: Layout, module: str) -> dict[str, str | None]:
    """Every package module that importing `module` executes -> the module that imported it.

    Follows module-level runtime imports, and the parent packages of each module reached
    (Python runs `a/__init__.py` and `a/b/__init__.py` before `a.b.c`).
    """
    graph = layout.graph()
    reached: dict[str, str | None] = {}
    queue: deque[tuple[str, str | None]] = deque([(module, None)])
    while queue:
        name, via = queue.popleft()
        if name in reached or name not in layout.modules:
            continue
        reached[name] = via
        parts = name.split(".")
        for i in range(1, len(parts)):
            queue.append((".".join(parts[:i]), name))
        for succ in sorted(graph.get(name, ())):
            queue.append((succ, name))
    return reached


def torch_free_violations(layout: Layout, torch_free: Iterable[str] = TORCH_FREE,
                          heavy: Iterable[str] = HEAVY) -> list[str]:
    """Torch-free modules (names relative to the package) that import a heavy package when
    imported, each with the chain of imports that reaches it."""
    heavy = set(heavy)
    problems = []
    for relative in torch_free:
        module = f"{layout.root}.{relative}"
        if module not in layout.modules:
            problems.append(f"{module}: listed in TORCH_FREE but not found")
            continue
        reached = runtime_closure(layout, module)
        for name in sorted(reached):
            hits = sorted(layout.external.get(name, set()) & heavy)
            if hits:
                chain = [name]
                while (via := reached[chain[-1]]) is not None:
                    chain.append(via)
                path = " -> ".join([*reversed(chain), hits[0]])
                problems.append(f"{module} imports {hits[0]}: {path}")
                break
    return problems


@dataclass
class Report:
    """The measurements and offenders of one layout."""

    largest_module: tuple[str, int] | None
    longest_function: Function | None
    long_modules: list[str]
    long_functions: list[str]
    cycles: list[str]
    infunction_imports: list[str]
    layer_violations: list[str]
    torch_free_violations: list[str]
    syntax_errors: list[str]
    limits: Limits = LIMITS

    def failures(self) -> dict[str, list[str]]:
        """Each broken limit -> its offenders (empty when the layout is fine)."""
        found = {
            f"modules over {self.limits.module_lines} lines": self.long_modules,
            f"functions over {self.limits.function_lines} lines": self.long_functions,
            "import cycles": self.cycles if len(self.cycles) > self.limits.cycles else [],
            f"in-function imports of the package over {self.limits.infunction_imports}": (
                self.infunction_imports
                if len(self.infunction_imports) > self.limits.infunction_imports else []),
            "imports against the layer order": self.layer_violations,
            "torch-free modules that import torch": self.torch_free_violations,
            "files that do not parse": self.syntax_errors,
        }
        return {what: offenders for what, offenders in found.items() if offenders}


def check(layout: Layout, limits: Limits = LIMITS,
          layers: Sequence[tuple[str, Sequence[str]]] = LAYERS,
          torch_free: Iterable[str] = TORCH_FREE) -> Report:
    """Measure a layout against the limits."""
    by_size = sorted(layout.module_lines.items(), key=lambda kv: (-kv[1], kv[0]))
    by_length = sorted(layout.functions, key=lambda f: (-f.lines, f.path, f.lineno))
    return Report(
        largest_module=(layout.modules[by_size[0][0]], by_size[0][1]) if by_size else None,
        longest_function=by_length[0] if by_length else None,
        long_modules=[f"{layout.modules[m]} ({n} lines)" for m, n in by_size
                      if n > limits.module_lines],
        long_functions=[str(f) for f in by_length if f.lines > limits.function_lines],
        cycles=[" -> ".join(c) for c in import_cycles(layout.graph())],
        infunction_imports=[str(i) for i in layout.imports if i.in_function],
        layer_violations=layer_violations(layout, layers),
        torch_free_violations=torch_free_violations(layout, torch_free),
        syntax_errors=list(layout.syntax_errors),
        limits=limits,
    )


def render(report: Report) -> str:
    """The report as text: measurements first, then each list of offenders."""
    lim = report.limits
    lines = []
    if report.largest_module:
        path, n = report.largest_module
        lines.append(f"largest module: {path} ({n} lines; limit {lim.module_lines})")
    if report.longest_function:
        f = report.longest_function
        lines.append(f"longest function: {f.path}:{f.lineno} {f.qualname} ({f.lines} lines; "
                     f"limit {lim.function_lines})")
    sections = [
        (f"modules over {lim.module_lines} lines", report.long_modules),
        (f"functions over {lim.function_lines} lines", report.long_functions),
        (f"import cycles (limit {lim.cycles})", report.cycles),
        (f"in-function imports of the package (limit {lim.infunction_imports})",
         report.infunction_imports),
        ("imports against the layer order", report.layer_violations),
        ("torch-free modules that import torch", report.torch_free_violations),
    ]
    if report.syntax_errors:
        sections.append(("files that do not parse", report.syntax_errors))
    for title, items in sections:
        lines.append(f"{title}: {len(items)}")
        lines.extend(f"    {item}" for item in items)
    failures = report.failures()
    lines.append("layout: OK" if not failures else "layout: FAILED (" + "; ".join(failures) + ")")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[1] / "loralab"
    parser.add_argument("package", nargs="?", default=str(default),
                        help="the package directory (default: %(default)s)")
    args = parser.parse_args(argv)
    package = Path(args.package)
    if not (package / "__init__.py").is_file():
        print(f"check_layout: {package} is not a package directory", file=sys.stderr)
        return 2
    report = check(read_layout(package))
    print(render(report))
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
