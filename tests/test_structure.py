"""The package's layout: no import cycle between its modules (imports inside functions count), no
private name imported from another module, and no library module that needs the demo worlds."""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "fdbpl_hf")


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, str]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> imported package module (every import statement, at any depth), and the
    private names imported across modules."""
    edges, private = {m: set() for m in modules}, []
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if not target.startswith("fdbpl_hf"):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    edges[module].add(full if full in modules else target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{module} imports {alias.name} from {target}")
            elif isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name in modules)
    # a module importing its own package (re-exports) is not a dependency on its siblings
    return {m: {d for d in ds if d != m and not m.startswith(d + ".")} for m, ds in edges.items()}, private


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_no_import_cycle_and_no_private_cross_module_import():
    edges, private = _imports(_modules())
    assert edges["fdbpl_hf.ril.build"] >= {"fdbpl_hf.ril.sharding"}  # the scan sees real edges
    assert _cycle(edges) == []
    assert private == []


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_library_modules_do_not_need_the_demo_worlds():
    """Importing the library (models, training, tables, evaluation, registry, protocol) loads
    nothing of fdbpl_hf.testing; the registry's digit worlds name their loader by import path."""
    code = ("import sys, fdbpl_hf, fdbpl_hf.data, fdbpl_hf.evaluation, fdbpl_hf.protocol, fdbpl_hf.pipeline, "
            "fdbpl_hf.plots, fdbpl_hf.metrics\n"
            "print(sorted(m for m in sys.modules if m.startswith('fdbpl_hf.testing') or m in "
            "('fdbpl_hf.zoo', 'fdbpl_hf.offline')))\n"
            "from fdbpl_hf.data import resolve_dataset\n"
            "print(resolve_dataset('digits').loader)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "fdbpl_hf.testing.worlds:load_digits_split"]


def test_old_module_paths_are_the_moved_modules():
    import fdbpl_hf.offline
    import fdbpl_hf.testing.worlds
    import fdbpl_hf.testing.zoo
    import fdbpl_hf.zoo

    assert fdbpl_hf.offline is fdbpl_hf.testing.worlds and fdbpl_hf.zoo is fdbpl_hf.testing.zoo
