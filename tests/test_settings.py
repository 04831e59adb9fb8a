"""The one settings loader (llb_edge/config.py) on serve.toml and the gateway's TOML: files read,
command-line layers over them, errors that name the key and the file, defaults with one owner."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llb_edge.cli import app
from llb_edge.config import ConfigError
from llb_edge.protocol import DEFAULT_CONTROL, DEFAULT_INTAKE, DEFAULT_RESULTS
from llb_edge.runtime.serve_options import ServeOptions, load_serve_options

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path


def test_the_example_serve_file_loads_and_names_only_real_settings() -> None:
    options = load_serve_options(REPO / "configs" / "serve.example.toml", {})
    assert options.intake != DEFAULT_INTAKE  # the example opens the intake to the cameras' network
    assert options.results == DEFAULT_RESULTS and options.control == DEFAULT_CONTROL


def test_file_then_command_line(tmp_path: Path) -> None:
    path = _write(tmp_path, 'max_batch = 4\ncontrol = "off"\nreload_allow = ["/srv/a"]\nmax_wait_ms = 3\n'
                            '[capture]\npool_dir = "/srv/pool"\ncamera_rates = { cam1 = 0.5 }\n'
                            '[regions.cam1]\nbox = [0, 0, 10, 20]\n')
    options = load_serve_options(path, {"max_batch": 2, "health_port": "off", "capture": {"camera_rates": {
        "cam2": "0.25"}}})
    assert (options.max_batch, options.control, options.health_port) == (2, None, None)
    assert options.reload_allow == (Path("/srv/a"),) and options.max_wait_ms == 3.0
    assert options.capture.pool_dir == Path("/srv/pool") and options.capture.camera_rates == {"cam1": 0.5, "cam2": 0.25}
    assert options.regions["cam1"].box == (0, 0, 10, 20)
    untouched = {f.name for f in dataclasses.fields(ServeOptions)} - {
        "max_batch", "control", "health_port", "reload_allow", "max_wait_ms", "capture", "regions"}
    assert all(getattr(options, name) == getattr(ServeOptions(), name) for name in untouched)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_bach = 8\n", "unknown config key 'max_bach'"),
        ('max_batch = "8"\n', "max_batch: expected int, got '8'"),
        ("max_batch = 2.5\n", "max_batch: expected int"),
        ('intake = 5555\n', "intake: expected a string"),
        ('[capture]\nfsync = "yes"\n', "capture.fsync: expected true/false"),
        ('[capture]\nrat = 0.1\n', "unknown config key 'capture.rat'"),
        ('reload_allow = "/srv/a"\n', "reload_allow: expected a list"),
        ("[regions.cam1]\nbox = [1, 2, 3]\n", "regions.cam1.box: expected a list of 4"),
        ("capture = 1\n", "capture: expected a table of settings"),
    ],
)
def test_bad_files_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_serve_options(path, {})
    assert str(path) in str(caught.value)
    result = runner.invoke(app, ["serve", str(tmp_path), "--config", str(path)])
    assert result.exit_code == 2 and str(path) in result.output and message.split("'")[0] in result.output


def test_bad_flags_and_invalid_values_are_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", str(tmp_path), "--health-port", "many"])
    assert result.exit_code == 2 and "command line: health_port" in result.output
    result = runner.invoke(app, ["serve", str(tmp_path), "--config", str(_write(tmp_path, "max_batch = 0\n"))])
    assert result.exit_code == 2 and "max_batch must be >= 1" in result.output


def test_serve_help_shows_the_defaults_of_serve_options() -> None:
    """One owner of the defaults: the flags default to 'not given' and show ServeOptions' values."""
    import typer

    serve = typer.main.get_command(app).commands["serve"]
    defaults = ServeOptions()
    shown = {param.name: param.show_default for param in serve.params if hasattr(defaults, param.name)}
    assert len(shown) >= 20
    for name, value in shown.items():
        if name != "ort_threads":
            assert value == ("off" if getattr(defaults, name) is None else str(getattr(defaults, name))), name
    assert all(param.default is None for param in serve.params if param.name != "bundle")


def test_gateway_config_goes_through_the_same_loader(tmp_path: Path) -> None:
    from llb_edge.runtime.gateway import GatewayConfigError, load_config

    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nreconnect_max_s = 4\n[cameras.cam1]\n[adapters.plc]\ntype = "modbus-client"\n'
                    'port = "502"\n')
    with pytest.raises(GatewayConfigError, match=f"{path}: adapters.plc.port: expected int"):
        load_config(path)
    path.write_text('[gateway]\nreconnect_max_s = 4\n[cameras.cam1]\n[adapters.plc]\ntype = "s7"\n')
    config = load_config(path)
    assert config.reconnect.max_s == 4.0 and config.adapters[0].offset == {"cam1": 0}


def test_line_side_settings_import_without_the_runtime_extra() -> None:
    """`llb-edge --help` (and train) must work where pyzmq is not installed: serve's defaults come
    from a module that needs no ZeroMQ."""
    program = ("import sys; sys.modules['zmq'] = None; import llb_edge.cli, llb_edge.runtime.serve_options; "
               "print('ok')")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
