"""The layers: the library (cma_clip/*.py) never imports the studio, the lab or app.py; the
studio never imports the lab or app.py. Imports only go down."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cma_clip"
ENTRY_POINTS = {"bench.py", "experiments.py"}  # `python -m cma_clip.bench|experiments`: the lab's command lines


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def reaches(names: set[str], layers: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == layer or n.startswith(layer + ".") for layer in layers))


LIBRARY = sorted(p for p in PACKAGE.glob("*.py") if p.name not in ENTRY_POINTS)
STUDIO = sorted((PACKAGE / "studio").glob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_the_library_imports_neither_the_studio_nor_the_lab_nor_the_app(path):
    assert reaches(imported_modules(path), ("cma_clip.studio", "cma_clip.lab", "app")) == []


@pytest.mark.parametrize("path", STUDIO, ids=lambda p: p.name)
def test_the_studio_imports_neither_the_lab_nor_the_app(path):
    assert reaches(imported_modules(path), ("cma_clip.lab", "app")) == []


def test_the_check_sees_a_relative_import_of_an_upper_layer():
    lab = PACKAGE / "lab" / "studio_speed.py"
    assert "cma_clip.studio" in imported_modules(lab)  # `from ..studio import Studio`
    assert reaches(imported_modules(ROOT / "app.py"), ("cma_clip.studio",))


def test_the_command_line_entry_points_load_the_lab_only_when_run():
    code = "import sys, cma_clip.bench, cma_clip.experiments; print(any(m.startswith('cma_clip.lab') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    help_text = subprocess.run([sys.executable, "-m", "cma_clip.bench", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert "--sections" in help_text


@pytest.mark.parametrize("command", ["cma_clip.predict", "cma_clip.mobilenet", "cma_clip.train"])
def test_a_command_of_the_package_runs_without_a_warning_that_it_was_imported_before(command):
    """`python -m cma_clip.predict`: the package's own imports left the module in sys.modules, and
    Python warned of "unpredictable behaviour" on every run (the package now imports on first use)."""
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", command, "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-500:]


def test_every_command_the_readme_names_says_what_it_does_in_whole_sentences():
    """`experiments --help` stopped mid-sentence ("...CMA-CLIP against": the first line of its docstring),
    and one command had no description at all (QA, session 33)."""
    commands = sorted(set(re.findall(r"python -m (cma_clip[.a-z_]*)", (ROOT / "README.md").read_text())))
    assert len(commands) >= 15

    def description(command: str) -> str:
        out = subprocess.run([sys.executable, "-m", command, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, (command, out.stderr[-300:])
        return out.stdout.split("\n\n")[1]  # after the usage lines

    with ThreadPoolExecutor(4) as pool:
        for command, text in zip(commands, pool.map(description, commands)):
            assert not text.startswith("options:") and text.rstrip().endswith((".", "?", ")", "`")), (command, text)


def test_the_package_still_exports_its_public_names():
    code = ("import cma_clip; from cma_clip import *; "
            "print(sorted(cma_clip.__all__) == sorted(n for n in cma_clip.__all__ if n in globals()), "
            "Predictor.__module__, CatalogueError.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "cma_clip.predict", "cma_clip.data"]
