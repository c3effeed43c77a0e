"""The documents: README.md and docs/ build into the site, and what they show runs.

Every Python block and every shell block of README.md and docs/ is run, one file at a
time in a scratch folder (blocks of one file share a namespace, as a reader's session
would), by Sybil: a block that needs what only a user has (ImageNet, a GPU, their own
images) follows a ``<!-- skip: next "what it needs" -->`` comment. Shell blocks may hold
only ``python tools/NAME.py ...`` commands; each runs as the tests run tools (in this
process, or in a fresh one for QAT) and must exit with status 0. Independently, every flag
that any document names for a tool must exist in that tool's flag registry.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import SkipTest

import pytest
from conftest import REPO, TEST_ENV

sybil = pytest.importorskip(
    "sybil", reason="the documentation tests need the docs extra: "
                    "pip install -c constraints.txt -e '.[docs]'")
from sybil.parsers.markdown import (  # noqa: E402
    CodeBlockParser,
    PythonCodeBlockParser,
    SkipParser,
)

RUN_DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
ALL_DOCS = [*RUN_DOCS, REPO / "BUILD.md", REPO / "CHANGELOG.md"]
# Tools that import tensorflow-model-optimization (which switches tf.keras to Keras 2 for
# the whole process) or start processes of their own run in a fresh interpreter.
SUBPROCESS_TOOLS = ("qat", "quickstart")
TOOL = re.compile(r"tools/(\w+)\.py")


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def _commands(source: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    lines = source.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _run_tool(command: str) -> None:
    """Runs one ``python tools/NAME.py ...`` command in the current folder; fails unless
    it exits with status 0."""
    words = shlex.split(command)
    if len(words) < 2 or words[0] != "python" or not TOOL.fullmatch(words[1]):
        raise AssertionError(f"a shell block that runs may hold only python tools/NAME.py "
                             f"commands (or skip it, saying what it needs): {command}")
    name = TOOL.fullmatch(words[1]).group(1)
    if name in SUBPROCESS_TOOLS:
        result = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *words[2:]],
                                env=TEST_ENV, capture_output=True, text=True, timeout=600)
        status, output = result.returncode, result.stdout + result.stderr
    else:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = importlib.import_module(name).main([f"{name}.py", *words[2:]])
        output = out.getvalue()
    assert status in (0, None), f"{command} exited with {status}:\n{output[-3000:]}"


def _run_shell_block(example) -> None:
    for command in _commands(example.parsed):
        _run_tool(command)


SYBIL = sybil.Sybil(parsers=[PythonCodeBlockParser(), SkipParser(),
                             CodeBlockParser("bash", _run_shell_block)])


@pytest.mark.parametrize("path", RUN_DOCS, ids=_name)
def test_examples_run(path, tmp_path, monkeypatch):
    """Every block of one document runs, in order, in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    document = SYBIL.parse(path)
    skipped = []
    for example in document:
        try:
            example.evaluate()
        except SkipTest as e:
            skipped.append(f"line {example.line}: {e}")
    print(f"{_name(path)}: skipped {skipped}")
    import keras

    keras.backend.clear_session()


def test_skipped_blocks_say_what_they_need():
    for path in RUN_DOCS:
        for match in re.finditer(r"<!--\s*skip:(.*?)-->", path.read_text()):
            assert re.fullmatch(r'\s*next\s+"[^"]{10,}"\s*', match.group(1)), (
                f"{_name(path)}: {match.group(0)} must say what the next block needs, "
                'e.g. <!-- skip: next "needs ImageNet and a GPU" -->')


def test_enough_examples_run():
    """At least five Python blocks across the documents are not skipped."""
    count = 0
    for path in RUN_DOCS:
        text = path.read_text()
        count += len(re.findall(r"^```python$", text, re.M)) - len(
            re.findall(r'<!-- skip: next "[^"]*" -->\n```python$', text, re.M))
    assert count >= 5, count


def _flag_names(tool: str) -> set[str]:
    from absl import flags

    registry = importlib.import_module(tool).FLAGS
    # A tool run by absl's app.run keeps its one flag in absl's global registry.
    names = {registry.name} if isinstance(registry, flags.FlagHolder) else set(registry)
    return names | {"help", "helpfull"}


def _named_flags(path: Path):
    """(tool, flag, line) for every flag written after ``tools/NAME.py`` on one line (code
    blocks with their continuation lines joined, inline code, table cells)."""
    text = path.read_text().replace("\\\n", " ")
    for number, line in enumerate(text.splitlines(), 1):
        for match in TOOL.finditer(line):
            segment = re.split(r"`|\||&&|;|tools/\w+\.py", line[match.end():])[0]
            for flag in re.findall(r"(?<![\w-])--([A-Za-z_]\w*)", segment):
                yield match.group(1), flag, number


def test_every_flag_named_in_the_documents_exists():
    missing = []
    for path in ALL_DOCS:
        for tool, flag, line in _named_flags(path):
            if not (REPO / "tools" / f"{tool}.py").is_file():
                missing.append(f"{_name(path)}:{line}: tools/{tool}.py does not exist")
                continue
            names = _flag_names(tool)
            if flag not in names and not (flag.startswith("no") and flag[2:] in names):
                missing.append(f"{_name(path)}:{line}: tools/{tool}.py has no --{flag}")
    assert not missing, "\n".join(missing)


def test_documents_speak_to_users():
    """No paths of this repository's neighbours and no words of how the work was done."""
    for path in [REPO / "README.md", REPO / "BUILD.md", REPO / "CHANGELOG.md",
                 *sorted((REPO / "docs").rglob("*.md"))]:
        text = path.read_text()
        for pattern in (r"\.\./shared", r"\bissues?\b", r"\blanding\b", r"\btickets?\b",
                        r"\bsidecar\b"):
            found = re.search(pattern, text, re.I)
            assert found is None, f"{_name(path)}: {found.group(0)!r} at {found.start()}"


def test_readme_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "## Contents" in readme
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n    {ci}\n" in readme, "the README test command must be .ci/run's last line"
    for section in ("## Load a model", "## Pretrained weights", "## Train ResNet-50 on GPUs",
                    "## Fine-tune on your own images", "## Quantize and export to TFLite",
                    "## Deploy on Android"):
        assert section in readme
    assert "python tools/train.py --depth=50 " in readme
    assert "--initial_weights=cifar10" in readme and "--initial_weights=imagenet" in readme


def test_mkdocs_build_strict(tmp_path):
    """The site builds with no warning: every link, anchor and API reference resolves."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: "
                                         "pip install -c constraints.txt -e '.[docs]'")
    env = {**TEST_ENV, "TF_CPP_MIN_LOG_LEVEL": "3", "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + TEST_ENV.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                             "--site-dir", str(tmp_path / "site")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "pipeline" / "index.html").is_file()
