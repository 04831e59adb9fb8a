"""Type-check the package with mypy (settings in pyproject.toml's [tool.mypy]); exit non-zero on any error.

trainer/, exporters/ and runtime/ sit at the top of the repository but install as llb_edge.trainer,
llb_edge.exporters and llb_edge.runtime (pyproject's package-dir). mypy cannot follow that mapping, so
this builds the installed layout as a tree of links under build/typecheck/ and checks that tree; the
error lines are printed with the repository's own paths. mypy's cache (.mypy_cache/) keeps reruns fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREE = REPO / "build" / "typecheck"
# The installed package's subpackages that live at the top of the repository (pyproject's package-dir).
TOP_LEVEL_SUBPACKAGES = ("trainer", "exporters", "runtime")


def build_package_tree() -> Path:
    """Link the repository's folders into the installed layout under TREE; return the package folder."""
    package = TREE / "llb_edge"
    shutil.rmtree(TREE, ignore_errors=True)
    package.mkdir(parents=True)
    for entry in sorted((REPO / "llb_edge").iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(os.path.relpath(entry, package))
    for name in TOP_LEVEL_SUBPACKAGES:
        (package / name).symlink_to(os.path.relpath(REPO / name, package))
    return package


def repository_path(line: str) -> str:
    """Rewrite a mypy output line that names a file in the linked tree to the file's repository path."""
    prefix = str(TREE.relative_to(REPO)) + os.sep
    if not line.startswith(prefix):
        return line
    linked, _, rest = line.partition(":")
    real = os.path.relpath(os.path.realpath(REPO / linked), REPO)
    return f"{real}:{rest}"


def main() -> int:
    """Run mypy over the package and print its report with repository paths; return mypy's exit status."""
    try:
        import mypy  # noqa: F401  (only to fail with a clear message when the dev extra is missing)
    except ImportError:
        print("mypy is not installed: it comes with the dev extra (bash scripts/setup-venv.sh)", file=sys.stderr)
        return 2
    package = build_package_tree()
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), str(package.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    for line in (result.stdout + result.stderr).splitlines():
        print(repository_path(line))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
