"""Fixtures for the runtime tests: contract-test-model ONNX files (exported once per session) and
fresh bundles built from them (the model itself is described in runtime_harness).

Test modules load this file with ``pytest_plugins = ["runtime_fixtures"]``. tests/runtime has no
conftest.py on purpose: without __init__.py files every conftest is imported as the module
"conftest", and a second one would shadow tests/conftest.py, which other test modules import
helpers from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_harness import export_contract_model, make_bundle


@pytest.fixture(scope="session")
def contract_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_contract_model(tmp_path_factory.mktemp("contract") / "contract.onnx")


@pytest.fixture(scope="session")
def nan_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_contract_model(tmp_path_factory.mktemp("contract-nan") / "nan.onnx", nan=True)


@pytest.fixture(scope="session")
def fixed_batch_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_contract_model(tmp_path_factory.mktemp("contract-fixed") / "fixed3.onnx", fixed_batch=3)


@pytest.fixture
def bundle_dir(tmp_path: Path, contract_onnx: Path) -> Path:
    """A fresh, writable contract-test-model bundle (version "1", threshold 0.1)."""
    return make_bundle(tmp_path / "bundle-v1", contract_onnx)
