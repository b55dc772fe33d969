"""The layering of issue 20: the run layer (one run) sits below fl/ and study/, the study package above both."""

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "florg"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_the_run_layer_imports_neither_fl_nor_study():
    bad = [(p.name, m) for p in sorted((SRC / "run").glob("*.py")) for m in _imports(p)
           if m.startswith(("florg.fl", "florg.study", "..fl", "..study"))]
    assert not bad


def test_study_modules_are_small_and_import_no_circle():
    deps = {}
    for p in sorted((SRC / "study").glob("*.py")):
        assert len(p.read_text().splitlines()) <= 500, p.name
        deps[p.stem] = {m.lstrip(".") for m in _imports(p) if m.startswith(".") and m != "."} | {
            m.split(".")[2] for m in _imports(p) if m.startswith("florg.study.")}
    seen: dict[str, int] = {}

    def visit(name: str) -> None:  # depth-first; 1 = on the path, 2 = done
        assert seen.get(name) != 1, f"import circle through {name}"
        if seen.get(name) == 2:
            return
        seen[name] = 1
        for dep in deps.get(name, ()):
            visit(dep)
        seen[name] = 2

    for name in deps:
        visit(name)


@pytest.mark.parametrize(("old", "name", "home"), [
    ("florg.run.study", "load_study", "florg.study.spec"),
    ("florg.run.study", "run_phase", "florg.study.execution"),
    ("florg.run.study", "select_lrs", "florg.study.selection"),
    ("florg.run.compare", "run_compare", "florg.study.compare"),
])
def test_old_paths_still_work_with_a_deprecation_warning(old, name, home):
    with pytest.warns(DeprecationWarning, match=home):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(home), name)
    assert not hasattr(importlib.import_module(old), "_build_config")  # private names are not kept
