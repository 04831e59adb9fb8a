"""Packaging: namespaced install layout, and a line-side import path free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_installs_everything_under_llb_edge(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("llb_edge-*.whl"))
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"llb_edge", wheel.name.split("-py3")[0] + ".dist-info"}
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("llb_edge/trainer/train.py", "llb_edge/exporters/__init__.py", "llb_edge/runtime/daemon.py"):
        assert module in names


def run_isolated(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run in a clean directory so the repository's top-level folders are not on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_generic_names_are_not_claimed(tmp_path):
    result = run_isolated(
        "import importlib.util as u; import llb_edge.trainer, llb_edge.runtime, llb_edge.exporters;"
        "print([u.find_spec(n) is None for n in ('trainer', 'runtime', 'exporters')])", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[True, True, True]"


def test_line_side_imports_without_torch(tmp_path):
    """sys.modules['torch'] = None makes any torch import fail, as on a line PC without it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import llb_edge, llb_edge.cli, llb_edge.bundle, llb_edge.protocol, llb_edge.metrics, llb_edge.runs\n"
        "import llb_edge.data.readers, llb_edge.data.images, llb_edge.data.transforms\n"
        "import llb_edge.runtime.daemon, llb_edge.runtime.backends, llb_edge.runtime.replay, llb_edge.runtime.watch\n"
        "print('ok', 'torch' in [m for m in sys.modules if sys.modules[m] is not None])"
    )
    result = run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok False"


# The steps talk through artifacts on disk (run dir, bundle, capture pool), never by importing each
# other; the modules that compose steps form the one top layer.
TOP_LAYER = {"llb_edge/cli.py", "llb_edge/retrain.py"}
STEP_PACKAGES = {"trainer": "llb_edge.trainer", "exporters": "llb_edge.exporters", "runtime": "llb_edge.runtime"}


def imported_modules(path) -> set[str]:
    """Every module a file imports, at module level or inside a function (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the layer check reads absolute names only)"
            # `from llb_edge import runtime` imports the package llb_edge.runtime.
            found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return found


def imports_of(folder: str) -> dict[str, set[str]]:
    return {str(path.relative_to(REPO)): imported_modules(path) for path in sorted((REPO / folder).rglob("*.py"))}


def importers_of(files: dict[str, set[str]], package: str) -> list[str]:
    return [f"{name} imports {module}" for name, modules in files.items() for module in sorted(modules)
            if module == package or module.startswith(package + ".")]


def test_trainer_and_runtime_do_not_import_each_other():
    assert importers_of(imports_of("trainer"), STEP_PACKAGES["runtime"]) == []
    assert importers_of(imports_of("runtime"), STEP_PACKAGES["trainer"]) == []


def test_shared_modules_import_no_step():
    shared = {name: modules for name, modules in imports_of("llb_edge").items() if name not in TOP_LAYER}
    assert "llb_edge/pool.py" in shared and "llb_edge/runs.py" in shared
    assert [line for package in STEP_PACKAGES.values() for line in importers_of(shared, package)] == []
    # The check sees what it should: the top layer does import the steps.
    top = {name: imports_of("llb_edge")[name] for name in TOP_LAYER}
    assert all(importers_of(top, package) for package in STEP_PACKAGES.values())
