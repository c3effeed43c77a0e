"""The package's layout: stage sub-packages under the import contract of pyproject.toml,
no import circle anywhere (imports inside functions count), lazy sub-packages, and each
run-folder file name spelled once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TEST_ENV

PACKAGE = REPO / "keras_resnet"
PIPELINE = PACKAGE / "pipeline"


def test_the_import_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e .[dev])")
    result = subprocess.run([str(lint)], cwd=REPO, env=TEST_ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _import_graph() -> dict[str, set[str]]:
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter "
                                                "(pip install -e .[dev])")
    graph = grimp.build_graph("keras_resnet")
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycles_finds_a_circle_and_only_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere_in_the_package():
    assert cycles(_import_graph()) == []


def test_the_pipeline_is_stage_folders_with_few_modules_beside_them():
    stages = sorted(p.name for p in PIPELINE.iterdir()
                    if p.is_dir() and (p / "__init__.py").exists())
    assert stages == ["data", "deploy", "quantization", "run", "training"]
    flat = sorted(p.stem for p in PIPELINE.glob("*.py") if p.stem != "__init__")
    assert len(flat) <= 8, flat
    # no sub-package or module is named like a public function: importing it would
    # shadow the function of the same name on keras_resnet.pipeline
    from keras_resnet import pipeline

    names = set(pipeline.__all__)
    assert not names & set(stages) and not names & set(flat)


def test_importing_the_pipeline_and_its_stages_loads_no_tensorflow():
    code = ("import sys\n"
            "import keras_resnet.pipeline\n"
            "for stage in ('data', 'run', 'training', 'deploy', 'quantization'):\n"
            "    __import__('keras_resnet.pipeline.' + stage)\n"
            "import keras_resnet.pipeline.run.config, keras_resnet.pipeline.run.lineage\n"
            "heavy = [m for m in ('tensorflow', 'tensorflow_model_optimization', "
            "'mediapipe', 'onnxruntime') if m in sys.modules]\n"
            "print(heavy)")
    env = {**TEST_ENV, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _string_literals(path: Path):
    """``(line, value)`` of the string constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                      ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            yield node.lineno, node.value


def test_each_run_folder_file_name_is_spelled_once():
    from keras_resnet.pipeline.run import layout

    # File names; the folder names (checkpoints/, logs/) are also words of the checkpoint
    # record's keys.
    names = {*layout.RUN_FILES, layout.CHECKPOINT_STATE, layout.LOCK}
    home = PIPELINE / "run" / "layout.py"
    spelled = [f"{path.relative_to(REPO)}:{line} {value!r}"
               for path in sorted(PACKAGE.rglob("*.py")) if path != home
               for line, value in _string_literals(path) if value in names]
    assert spelled == []


@pytest.mark.parametrize("path", sorted(
    str(p.relative_to(REPO)) for p in PIPELINE.rglob("*.py")))
def test_every_pipeline_module_says_what_it_is(path):
    tree = ast.parse((REPO / path).read_text())
    assert ast.get_docstring(tree), f"{path} has no module docstring"
