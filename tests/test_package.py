"""Packaging: namespaced install layout, and a line-side import path free of torch."""

from __future__ import annotations

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
