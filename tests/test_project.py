"""The project's own files: environment.yml matches pyproject.toml, the book's toc resolves."""
import re
import tomllib
from pathlib import Path

import yaml

from pktlib.book import notebook_chapters, toc_entries

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
