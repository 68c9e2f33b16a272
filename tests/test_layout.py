"""The package layout stays readable: no import cycles between vllm_sdsat modules, no oversized module."""
import ast

from conftest import REPO

PACKAGE = REPO / "vllm_sdsat"
MAX_LINES = 420


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] == "patches":  # installed as vllm_sdsat.patches
        parts = ("vllm_sdsat", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files():
    return [*PACKAGE.rglob("*.py"), *(REPO / "patches").glob("*.py")]


def imports_of(path, modules):
    """vllm_sdsat modules that `path` imports, at any depth of the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_no_import_cycles():
    files = {module_name(p): p for p in package_files()}
    graph = {m: imports_of(p, files) - {m} for m, p in files.items()}
    # A package imports its own submodules' names freely; what matters is cycles between modules.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", "import cycle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_module_is_oversized():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in package_files()}
    assert {f: n for f, n in sizes.items() if n > MAX_LINES} == {}


def test_parts_in_the_readme_exist():
    readme = (REPO / "README.md").read_text()
    for folder in ("vllm_sdsat/engine", "vllm_sdsat/training", "vllm_sdsat/bench", "vllm_sdsat/reference.py",
                   "patches", "examples/models"):
        assert f"[`{folder}" in readme and (REPO / folder).exists(), folder
