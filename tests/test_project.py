"""The README's quick start and CI stay in sync."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", text)
    assert m, "README.md must mark its test command with <!-- test-command -->"
    return m.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert command in ci_lines
    assert "pytest" in command


def test_quick_start_has_two_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.+?)\n```", quick, flags=re.S)
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)


def _imports(path: pathlib.Path, package: str, modules) -> set[str]:
    """The `package` modules `path` imports, at module level or inside functions (absolute
    imports): `import a.b`, `from a import b` (b a module) -> `a.b`; `from a import name` -> `a`
    (the name comes from `a`'s namespace, so `a` must have run, even when `a` is a parent)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name == package or name.startswith(f"{package}.")}


def _module_graph(package: str = "vit_jax") -> dict[str, set[str]]:
    """module -> the modules it imports. Importing `a.b.c` also runs `a` and `a.b` first; those
    that are the importer's own parent packages are already running then, so only an explicit
    import of one (`import a.b`, `from a.b import name`) is an edge to it."""
    root = ROOT / package
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path, package, modules):
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]  # `import pkg.module.attribute`
            pieces = imported.split(".")
            for i in range(1, len(pieces) + 1):  # parent packages run first
                parent = ".".join(pieces[:i])
                is_own_parent = name.startswith(f"{parent}.")
                if (
                    parent in modules
                    and parent != name
                    and (parent == imported or not is_own_parent)
                ):
                    deps.add(parent)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    """No module of vit_jax reaches itself through imports (function-level imports included, and
    imports of a module's own parent package: `vit_jax.models.families` importing
    `vit_jax.models` inside a function is the cycle models -> families -> models)."""
    graph = _module_graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_library_modules_declare_their_public_surface():
    """Every library module (not a CLI's `main` module) has `__all__`, naming only its own names;
    no function runs over 60 lines unless its docstring says why (`Long: ...`)."""
    import ast

    problems = []
    for path in sorted((ROOT / "vit_jax").rglob("*.py")):
        tree = ast.parse(path.read_text())
        defined = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.ImportFrom, ast.Import)):
                targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
                defined |= {t.id for t in targets if isinstance(t, ast.Name)}
                defined |= {(a.asname or a.name).split(".")[0] for a in getattr(node, "names", [])}
        exported = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                exported = [ast.literal_eval(e) for e in node.value.elts]
        is_cli = "main" in defined or path.name in ("__main__.py", "__init__.py")
        if exported is None and not is_cli:
            problems.append(f"{path.relative_to(ROOT)}: no __all__")
        for name in exported or ():
            if name not in defined:
                problems.append(f"{path.relative_to(ROOT)}: __all__ names {name!r}, not defined")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > 60 and "Long:" not in doc:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length}")
    assert not problems, "\n".join(problems)
