"""The package's shape: imports inside refbitnet/ point one way (no cycle), and refbitnet/model.py, the
readable forward pass, imports nothing but NumPy and the few modules its math needs.

Imports are read from the source with ast (module level and inside functions alike), so a cycle hidden
behind a function-level import fails here too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "refbitnet"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The refbitnet modules a file imports (absolute names), wherever the import statement stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "refbitnet"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "refbitnet":
                continue
            for alias in node.names:              # "from . import kernels" imports a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    edges = {name: imports_of(path) for name, path in MODULES.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: only real edges count, not the parents
    return edges


def find_cycle(edges):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_refbitnet():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_py_imports_only_numpy_and_its_math():
    tree = ast.parse((PACKAGE / "model.py").read_text(encoding="utf-8"))
    outside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            outside |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            outside.add(node.module)
    assert outside <= {"numpy", "__future__"}, outside
    assert imports_of(PACKAGE / "model.py") <= {"refbitnet.bf16", "refbitnet.bitlinear", "refbitnet.errors",
                                                "refbitnet.quant"}, imports_of(PACKAGE / "model.py")


def test_the_readable_path_imports_no_fast_path():
    """The one-way rule: refbitnet.model never reaches the runtime, the kernels or Numba, even indirectly."""
    edges = graph()
    seen, todo = set(), ["refbitnet.model"]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(edges[node])
    assert not {m for m in seen if m.startswith(("refbitnet.runtime", "refbitnet.kernels", "refbitnet.api",
                                                    "refbitnet.checkpoint", "refbitnet.generate",
                                                    "refbitnet.tokenizer"))}, seen
