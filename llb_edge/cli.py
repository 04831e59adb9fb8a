"""The `llb-edge` command: dispatches to the trainer, exporters and runtime.

Heavy modules are imported inside each command so `llb-edge serve` on a line PC never needs torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from llb_edge.bundle import VALIDATION_KEY, Bundle
from llb_edge.config import COMMAND_LINE
from llb_edge.errors import LLBEdgeError
from llb_edge.exporters.export_options import ExportOptions
from llb_edge.protocol import DEFAULT_CONTROL, DEFAULT_INTAKE, DEFAULT_RESULTS
from llb_edge.retrain import RetrainOptions
from llb_edge.runtime.logs import DEFAULT_LOG_LEVEL
from llb_edge.runtime.serve_options import ServeOptions

if TYPE_CHECKING:
    from llb_edge.runtime.versions import VersionChange

# Errors a user can fix: printed as one line, exit code 2. Anything else keeps its traceback.
USER_ERRORS = (LLBEdgeError, FileNotFoundError, NotADirectoryError)

# What `llb-edge serve/export/retrain --help` show as defaults: their options records' own, the only copies.
SERVE_DEFAULTS, EXPORT_DEFAULTS, RETRAIN_DEFAULTS = ServeOptions(), ExportOptions(), RetrainOptions()

app = typer.Typer(
    help="LLB-purified Dinomaly anomaly inspection: train on contaminated line data, export, serve to PLCs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML or JSON config file (see configs/).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override any config key, e.g. --set train.iterations=200 (repeatable)."),
]

# Options several commands share, spelled once.
DatasetOption = Annotated[str | None, typer.Option(help="mtd | mvtec | visa | realiad | folder | elpv.")]
CategoryOption = Annotated[str | None, typer.Option(help="Category for multi-category datasets.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages too.")]
ClientKeyOption = Annotated[Path | None, typer.Option("--curve-secret", help="This client's .key_secret (CURVE).")]
ServerKeyOption = Annotated[Path | None, typer.Option("--curve-server", help="The daemon's public .key (CURVE).")]
ReasonOption = Annotated[str, typer.Option(help="Why (recorded in the history).")]
ActorOption = Annotated[str | None, typer.Option(help="Who (recorded; default: user@host).")]


def fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    name: Annotated[str | None, typer.Option(help="Run name: outputs go to OUT_DIR/NAME.")] = None,
    out_dir: Annotated[str | None, typer.Option(help="Parent folder of run directories.")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset root (data.root).")] = None,
    dataset: DatasetOption = None,
    category: CategoryOption = None,
    weights: Annotated[
        str | None, typer.Option(help="Backbone weights: .safetensors, .pth, 'embedded', 'timm'.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N.")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16 (autocast).")] = None,
    iterations: Annotated[int | None, typer.Option(help="Final-model (stage 2) iterations.")] = None,
    stages: Annotated[
        str | None, typer.Option(help="'1,2': LLB screening then the final model; '2': no screening (baseline).")
    ] = None,
    k: Annotated[int | None, typer.Option("--k", help="LLB stage 1: number of subsets / sub-models.")] = None,
    keep: Annotated[str | None, typer.Option(
        help="LLB stage 1 cut: auto (default: outliers of the consensus score are suspects) or a fixed fraction of "
             "lowest-scored images kept (the paper's benchmark setting: 0.4).")] = None,
    submodel: Annotated[
        str | None, typer.Option(help="LLB stage 1 sub-model: knn (default) | dinomaly (paper).")
    ] = None,
    submodel_iterations: Annotated[int | None, typer.Option(help="LLB stage 1: iterations per sub-model.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (same name) where it stopped.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the test-split evaluation at the end.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Train a model: LLB screening (stage 1) and the final Dinomaly model (stage 2), then evaluate it.

    Writes a run directory (config.json, metadata.json, model.safetensors, metrics.json, overlays/).
    The whole frame is inspected: images are resized straight to the model input (data.resize =
    data.crop = 392). --set data.resize=448 gives the Dinomaly paper's 448 -> 392 centre crop, for
    paper-comparable benchmarks only: the border ring it drops (23% of the frame) is never inspected.
    train.calibration_fraction of the kept images is held back to calibrate the threshold.
    """
    setup_logging(verbose)
    from llb_edge.config import load_config
    from llb_edge.runs import CONFIG, METRICS, read_run_config

    flags = {
        "name": name, "out_dir": out_dir, "data.root": data, "data.dataset": dataset, "data.category": category,
        "model.weights": weights, "train.device": device, "train.precision": precision,
        "train.iterations": iterations, "llb.stages": stages, "llb.k": k, "llb.keep": keep,
        "llb.submodel": submodel, "llb.submodel_iterations": submodel_iterations,
    }
    settings = [f"{key}={value}" for key, value in flags.items() if value is not None] + list(overrides or [])
    try:
        cfg = load_config(config, settings)
        if resume and (cfg.run_dir / CONFIG).exists():
            saved = read_run_config(cfg.run_dir)
            saved.train.device = cfg.train.device
            cfg = saved
        from llb_edge.trainer.pipeline import run_training

        run_dir = run_training(cfg, resume=resume, evaluate_after=not no_eval)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"run directory: {run_dir}")
    metrics_path = run_dir / METRICS
    if metrics_path.exists():
        typer.echo(json.dumps(json.loads(metrics_path.read_text()), indent=2))


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    weights: Annotated[str | None, typer.Option(help="Backbone weights, if not at the path the run recorded.")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 (autocast; writes metrics_bf16.json).")] = "fp32",
) -> None:
    """Evaluate a trained run on its test split; writes metrics.json and overlays/ into the run."""
    setup_logging(False)
    from llb_edge.trainer.pipeline import run_evaluation

    if precision not in ("fp32", "bf16"):
        fail(f"--precision must be fp32 or bf16, got {precision!r}")
    try:
        metrics = run_evaluation(run_dir, device, weights, precision)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(json.dumps(metrics, indent=2))


def shown_default(defaults: object, key: str) -> str:
    """The default of a setting (dotted key) of the options record ``defaults``, as --help shows it."""
    value: Any = defaults
    for part in key.split("."):
        value = getattr(value, part)
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value) or "none"
    return "off" if value is None else str(value)


def given(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the flags not given (None), nested tables included."""
    kept = {key: given(value) if isinstance(value, dict) else value for key, value in values.items()}
    return {key: value for key, value in kept.items() if value is not None and value != {}}


def serve_option(key: str, help: str, *names: str) -> Any:  # noqa: A002 - typer's parameter name
    return typer.Option(*names, help=help, show_default=shown_default(SERVE_DEFAULTS, key))


def export_option(key: str, help: str, *names: str) -> Any:  # noqa: A002 - typer's parameter name
    return typer.Option(*names, help=help, show_default=shown_default(EXPORT_DEFAULTS, key))


def retrain_option(key: str, help: str, *names: str) -> Any:  # noqa: A002 - typer's parameter name
    return typer.Option(*names, help=help, show_default=shown_default(RETRAIN_DEFAULTS, key))


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (from llb-edge export).")],
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Settings file (TOML: configs/serve.example.toml); flags given override it.")] = None,
    intake: Annotated[str | None, serve_option("intake", "Endpoint frames arrive on.")] = None,
    intake_mode: Annotated[str | None, serve_option(
        "intake_mode", "pull: cameras PUSH to us; sub: we SUBscribe to cameras.")] = None,
    intake_connect: Annotated[bool | None, serve_option(
        "intake_connect", "Connect to --intake instead of binding it.")] = None,
    results: Annotated[str | None, serve_option("results", "PUB endpoint for results and heartbeats.")] = None,
    control: Annotated[str | None, serve_option(
        "control", "REP endpoint for reload/status/threshold, or 'off'.")] = None,
    health_host: Annotated[str | None, serve_option(
        "health_host", "Address of HTTP /live /ready /metrics and the operator page.")] = None,
    health_port: Annotated[str | None, serve_option(
        "health_port", "Port of the health server; 0 any free; 'off'.")] = None,
    backend: Annotated[str | None, serve_option(
        "backend", "auto | tensorrt | ort-cuda | openvino | ort-cpu | torch-cuda | torch-cpu (the torch ones need "
        "torch).")] = None,
    max_batch: Annotated[int | None, serve_option("max_batch", "Largest batch the dynamic batcher forms.")] = None,
    max_wait_ms: Annotated[float | None, serve_option(
        "max_wait_ms", "How long the oldest frame may wait for a batch.")] = None,
    queue_size: Annotated[int | None, serve_option(
        "queue_size", "Frames queued per camera before keep-newest drops.")] = None,
    post_workers: Annotated[int | None, serve_option(
        "post_workers", "Threads post-processing results (map resize, regions) while the next batch runs.")] = None,
    max_cameras: Annotated[int | None, serve_option("max_cameras", "Distinct camera ids accepted.")] = None,
    max_payload_bytes: Annotated[int | None, serve_option(
        "max_payload_bytes", "Larger frame payloads are refused.")] = None,
    max_pixels: Annotated[int | None, serve_option(
        "max_pixels", "Larger frames are refused, from their header before any decoding.")] = None,
    map_payload: Annotated[str | None, serve_option(
        "map_payload", "Attach anomaly maps: none | uint8 | float16.")] = None,
    heartbeat_s: Annotated[float | None, serve_option(
        "heartbeat_s", "Seconds between heartbeats on the results socket.")] = None,
    intake_hwm: Annotated[int | None, serve_option(
        "intake_hwm", "ZeroMQ high-water mark of the intake socket.")] = None,
    results_hwm: Annotated[int | None, serve_option(
        "results_hwm", "ZeroMQ high-water mark of the results socket.")] = None,
    curve_secret: Annotated[Path | None, serve_option("curve_secret", "Server .key_secret: enables CURVE.")] = None,
    curve_allowed: Annotated[Path | None, serve_option(
        "curve_allowed", "Folder of allowed client .key files.")] = None,
    control_allowed: Annotated[Path | None, serve_option(
        "control_allowed", "Folder of operator .key files allowed on the control socket (required with CURVE).")] = (
        None),
    reload_allow: Annotated[list[Path] | None, serve_option(
        "reload_allow", "A folder reloads may load bundles from, besides BUNDLE (repeatable).")] = None,
    camera_idle_s: Annotated[float | None, serve_option(
        "camera_idle_s", "Seconds without frames after which a camera gives up its slot.")] = None,
    ort_threads: Annotated[int | None, typer.Option(
        help="ONNX Runtime intra-op (or OpenVINO inference) threads (default: all).")] = None,
    capture_pool: Annotated[Path | None, serve_option(
        "capture.pool_dir", "Capture sampled frames into this pool folder.")] = None,
    capture_rate: Annotated[float | None, serve_option(
        "capture.rate", "Fraction of each camera's frames captured.")] = None,
    capture_camera_rate: Annotated[list[str] | None, typer.Option(
        help="A camera's own capture rate, CAMERA=RATE (repeatable).")] = None,
    capture_ng_rate: Annotated[float | None, serve_option(
        "capture.ng_rate", "NG frames captured with at least this probability.")] = None,
    capture_band: Annotated[float | None, serve_option(
        "capture.band", "Near-threshold band, relative: |score - t| <= band * t (0: off).")] = None,
    capture_band_rate: Annotated[float | None, serve_option(
        "capture.band_rate", "Near-threshold frames captured with this probability.")] = None,
    capture_quota_mb: Annotated[float | None, serve_option(
        "capture.quota_mb", "Disk quota of the pool; oldest frames evicted.")] = None,
    capture_queue: Annotated[int | None, serve_option(
        "capture.queue_size", "Frames waiting for the writer before drops.")] = None,
    capture_queue_mb: Annotated[float | None, serve_option(
        "capture.queue_mb", "Bytes waiting for the writer before drops.")] = None,
    capture_fsync: Annotated[bool | None, serve_option("capture.fsync", "fsync every captured frame.")] = None,
    roi: Annotated[list[str] | None, typer.Option(
        help="Inspect only this rectangle of a camera's frames, CAMERA=x,y,width,height in frame pixels "
             "(repeatable). Outside it nothing is inspected.")] = None,
    roi_mask: Annotated[list[str] | None, typer.Option(
        help="Inspect only a mask's non-zero pixels, CAMERA=mask.png, the mask the size of that camera's frames "
             "(repeatable; with --roi, cut to the rectangle).")] = None,
    ng_rate_window: Annotated[int | None, serve_option(
        "ng_rate_window", "Frames per camera over which the NG rate is compared with the bundle's expected rate.")] = (
        None),
    ng_rate_alpha: Annotated[float | None, serve_option(
        "ng_rate_alpha", "False-alarm probability of the NG-rate warning per full window (binomial test).")] = None,
    log_level: Annotated[str | None, serve_option("log_level", "DEBUG | INFO | WARNING.")] = None,
) -> None:
    """Serve a bundle on the line: frames in over ZeroMQ, OK/NG results and anomaly maps out.

    Settings come from the defaults shown here, then the --config file (the same keys: a line PC's
    service reads its settings from it, docs/line-pc.md), then the flags given. Needs no torch.
    SIGTERM finishes in-flight frames and exits; SIGHUP (or `llb-edge ctl reload`) hot-reloads the
    bundle after a self-check. JSON logs go to stderr, the resolved settings first.
    """
    from llb_edge.runtime.capture import parse_camera_rates
    from llb_edge.runtime.daemon import serve as run_daemon
    from llb_edge.runtime.roi import parse_regions
    from llb_edge.runtime.serve_options import load_serve_options

    try:
        flags = given({
            "intake": intake, "intake_mode": intake_mode, "intake_connect": intake_connect, "results": results,
            "control": control, "health_host": health_host, "health_port": health_port, "backend": backend,
            "max_batch": max_batch, "max_wait_ms": max_wait_ms, "queue_size": queue_size,
            "post_workers": post_workers, "max_cameras": max_cameras, "max_payload_bytes": max_payload_bytes,
            "max_pixels": max_pixels, "map_payload": map_payload, "heartbeat_s": heartbeat_s,
            "intake_hwm": intake_hwm, "results_hwm": results_hwm, "curve_secret": curve_secret,
            "curve_allowed": curve_allowed, "control_allowed": control_allowed, "reload_allow": reload_allow,
            "camera_idle_s": camera_idle_s, "ort_threads": ort_threads,
            "regions": parse_regions(roi or [], roi_mask or []) or None,
            "ng_rate_window": ng_rate_window, "ng_rate_alpha": ng_rate_alpha, "log_level": log_level,
            "capture": {
                "pool_dir": capture_pool, "rate": capture_rate, "ng_rate": capture_ng_rate, "band": capture_band,
                "camera_rates": parse_camera_rates(capture_camera_rate or []) or None,
                "band_rate": capture_band_rate, "quota_mb": capture_quota_mb, "queue_size": capture_queue,
                "queue_mb": capture_queue_mb, "fsync": capture_fsync,
            },
        })
        options = load_serve_options(config, flags)
    except (*USER_ERRORS, ValueError) as err:
        fail(str(err))
    raise typer.Exit(run_daemon(bundle, options, settings_file=config))


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="A folder of images or a video file.")],
    to: Annotated[str, typer.Option("--to", help="The daemon's intake endpoint.")] = DEFAULT_INTAKE,
    fps: Annotated[float, typer.Option(help="Frames per second; 0 = as fast as the daemon takes them.")] = 10.0,
    camera: Annotated[str, typer.Option(help="Camera id put in every frame header.")] = "cam0",
    encoding: Annotated[str, typer.Option(help="raw | jpeg | png.")] = "raw",
    loop: Annotated[bool, typer.Option(help="Repeat the source.")] = False,
    count: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    curve_secret: ClientKeyOption = None,
    curve_server: ServerKeyOption = None,
) -> None:
    """Stream a folder of images or a video to a daemon as camera frames (a camera simulator)."""
    from llb_edge.runtime.replay import replay as run_replay

    try:
        stats = run_replay(path, to, fps=fps, camera_id=camera, encoding=encoding, loop=loop, count=count,
                           curve_secret=curve_secret, curve_server_public=curve_server)
    except (*USER_ERRORS, ValueError) as err:
        fail(str(err))
    typer.echo(f"sent {stats.sent} frames ({stats.not_sent} not sent) in {stats.seconds:.1f} s, {stats.fps:.1f} fps")


@app.command()
def watch(
    endpoint: Annotated[str, typer.Argument(help="The daemon's results endpoint.")] = DEFAULT_RESULTS,
    camera: Annotated[list[str] | None, typer.Option(help="Only these camera ids (repeatable).")] = None,
    count: Annotated[int | None, typer.Option(help="Stop after this many results.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    heartbeats: Annotated[bool, typer.Option(help="Print heartbeats too.")] = False,
    curve_secret: ClientKeyOption = None,
    curve_server: ServerKeyOption = None,
) -> None:
    """Print a daemon's results live, one line per frame."""
    from llb_edge.runtime.watch import watch as run_watch

    run_watch(endpoint, cameras=camera, count=count, timeout_s=timeout, heartbeats=heartbeats,
              curve_secret=curve_secret, curve_server_public=curve_server)


@app.command()
def ctl(
    command: Annotated[str, typer.Argument(help="status | reload | threshold.")],
    value: Annotated[str | None, typer.Argument(help="reload: a bundle path; threshold: a number.")] = None,
    endpoint: Annotated[str, typer.Option(help="The daemon's control endpoint.")] = DEFAULT_CONTROL,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 30.0,
    curve_secret: Annotated[Path | None, typer.Option(
        help="This operator's .key_secret (daemons with CURVE; default $LLB_EDGE_CTL_SECRET).")] = None,
    curve_server: Annotated[Path | None, typer.Option(
        help="The daemon's public server .key (CURVE; default $LLB_EDGE_CTL_SERVER_KEY).")] = None,
) -> None:
    """Talk to a running daemon: status, reload [BUNDLE], threshold [VALUE].

    A daemon serving with CURVE answers only operators whose public key is in its --control-allowed
    folder: pass --curve-secret and --curve-server (or set the environment variables, which
    promote, rollback and retrain --notify use too).
    """
    from llb_edge.runtime.control import ControlKeys, send_control

    if (curve_secret is None) != (curve_server is None):
        fail("give both --curve-secret and --curve-server, or neither")
    keys = None if curve_secret is None or curve_server is None else ControlKeys(curve_secret, curve_server)
    args: dict[str, Any] = {}
    if value is not None:
        if command == "reload":
            args = {"path": value}
        else:
            try:
                args = {"value": float(value)}
            except ValueError:
                fail(f"threshold must be a number, got {value!r}")
    try:
        reply = send_control(endpoint, command, timeout_s=timeout, keys=keys, **args)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(json.dumps(reply, indent=2))
    if not reply.get("ok", True):
        raise typer.Exit(1)


keys_app = typer.Typer(
    help="CURVE keys for ZeroMQ sockets and OPC UA application certificates.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    name: Annotated[str, typer.Option(help="Key name: NAME.key (public) and NAME.key_secret are written.")],
    dir: Annotated[Path, typer.Option("--dir", help="Folder to write the key pair into.")] = Path("keys"),
) -> None:
    """Generate a CURVE key pair (server: keep the secret on the line PC; clients: copy NAME.key to
    the daemon's allowed folder)."""
    from llb_edge.runtime.keys import generate_keypair

    pair = generate_keypair(dir, name)
    typer.echo(f"public: {pair.public}\nsecret: {pair.secret}")


@keys_app.command("opcua-cert")
def keys_opcua_cert(
    name: Annotated[str, typer.Option(help="NAME.der (certificate) and NAME.pem (private key) are written.")],
    uri: Annotated[str, typer.Option(help="Application URI the certificate is issued for, e.g. urn:plant:gateway.")],
    role: Annotated[str, typer.Option(help="server: the gateway's own OPC UA server; client: the gateway "
                                           "writing into a PLC's server, or a client of the gateway.")] = "server",
    dir: Annotated[Path, typer.Option("--dir", help="Folder to write the files into.")] = Path("certs"),
) -> None:
    """Make a self-signed OPC UA application certificate (365 days) for the gateway's security settings.

    Give the .der to the other side to trust (the PLC's trust list, or the gateway's trusted_clients
    folder); the .pem private key stays where it was made.
    """
    from llb_edge.runtime.gateway.opcua import generate_certificate

    try:
        certificate, key = generate_certificate(dir, name, uri, role)
    except (ValueError, FileExistsError) as err:
        fail(str(err))
    typer.echo(f"certificate: {certificate}\nprivate key: {key}")


bench_app = typer.Typer(help="Benchmarks that produce tables for docs/.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


@bench_app.command("contamination")
def bench_contamination(
    data: Annotated[str, typer.Option(help="Dataset root.")],
    dataset: DatasetOption = "mtd",
    category: CategoryOption = None,
    alphas: Annotated[str, typer.Option(help="Contamination levels, comma-separated.")] = "0,0.1,0.2,0.4",
    ks: Annotated[str, typer.Option(help="k values for the ablation, comma-separated.")] = "1,3,5,7",
    variants: Annotated[str, typer.Option(
        help="Comma-separated: none (no screening), default (LLB as configured), fixed (keep 0.4, drop: the paper's "
             "cut), paper (keep 0.4 with Dinomaly sub-models), dinomaly, knn (configured cut, that sub-model), oracle "
             "(normal images only, from the planted labels: the ceiling for any screen).")
    ] = "none,default,fixed",
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated: one repeat each (split, stage 1, stage 2).")] = (
        "0,1,2"
    ),
    ablation_alphas: Annotated[str | None, typer.Option(help="Alphas for the k ablation (default: largest).")] = None,
    ablation_submodel: Annotated[str, typer.Option(help="Sub-model of the k ablation: dinomaly | knn.")] = (
        "dinomaly"
    ),
    out: Annotated[Path, typer.Option(help="Output folder (resumable).")] = Path("bench_out/contamination"),
    config: ConfigOption = None,
    overrides: SetOption = None,
) -> None:
    """Contamination benchmark: no screening vs LLB variants at several alphas and seeds, plus the k ablation.

    Prints mean ± standard deviation over the seeds per cell, and how well stage 1 ranked the planted defects.
    """
    setup_logging(False)
    from llb_edge.config import load_config

    settings = [f"data.root={data}", f"data.dataset={dataset}"] + ([f"data.category={category}"] if category else [])
    try:
        cfg = load_config(config, settings + list(overrides or []))
        from llb_edge.trainer.bench_contamination import run_contamination_bench

        table = run_contamination_bench(
            cfg, alphas=floats(alphas), ks=tuple(int(k) for k in floats(ks)), out_dir=out,
            variants=tuple(v.strip() for v in variants.split(",")),
            ablation_alphas=floats(ablation_alphas) if ablation_alphas else None, ablation_submodel=ablation_submodel,
            seeds=[int(seed) for seed in floats(seeds)],
        )
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(table.read_text())


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to create.")],
    format: Annotated[str | None, export_option(
        "formats", "onnx | tensorrt | openvino | all (onnx + tensorrt).", "--format")] = None,
    precision: Annotated[list[str] | None, export_option(
        "precisions", "ONNX precisions (repeatable): fp32, fp16.")] = None,
    model_id: Annotated[str | None, typer.Option(help="Model id (default: the run name).")] = None,
    model_version: Annotated[str | None, typer.Option(help="Model version (default: a UTC timestamp).")] = None,
    validation: Annotated[str | None, typer.Option(
        help="Labelled images ('test' or a JSONL sample list): prints the measured false-reject and escape "
             "rates at the threshold, and offers the F1-max threshold.")] = None,
    threshold_method: Annotated[str | None, export_option(
        "threshold_method",
        "calibrated: for --target-frr on the run's held-back calibration images (no labels) | quantile: the "
        "old training-score rule | f1max (needs --validation).")] = None,
    target_frr: Annotated[float | None, export_option(
        "target_frr",
        "False-reject rate you accept on normal parts (0.01 = 1%); the threshold is calibrated for it.")] = None,
    weights: Annotated[str | None, typer.Option(help="Backbone weights, if not where the run recorded them.")] = None,
    overwrite: Annotated[bool | None, export_option("overwrite", "Replace an existing bundle folder.")] = None,
) -> None:
    """Export a run's final model to a bundle: ONNX (fp32, fp16) and/or TensorRT, gated on parity.

    The export fails unless ONNX Runtime (and TensorRT, when built) reproduces the PyTorch model on
    real images within the stated tolerances; the measured figures go into bundle.json.
    TensorRT engines are built on the machine that runs them (llb-edge bundle build-engine).
    """
    setup_logging(False)
    from llb_edge.config import apply_settings
    from llb_edge.exporters.bundle_export import export_bundle

    try:
        options = apply_settings(EXPORT_DEFAULTS, given({
            "formats": format, "precisions": precision, "model_id": model_id, "model_version": model_version,
            "validation": validation, "threshold_method": threshold_method, "target_frr": target_frr,
            "weights": weights, "overwrite": overwrite}), COMMAND_LINE, text=True)
        bundle = export_bundle(run_dir, out, options)
    except USER_ERRORS as err:
        fail(str(err))
    show_bundle(bundle)


bundle_app = typer.Typer(help="Inspect and adjust an exported bundle.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


def show_bundle(bundle: Bundle) -> None:
    m = bundle.manifest
    typer.echo(f"bundle {bundle.root}: model {m.model_id} version {m.model_version}, encoder {m.encoder}")
    typer.echo(f"threshold {m.threshold.value:.6g} ({m.threshold.method}; set by {m.threshold.set_by} "
               f"at {m.threshold.set_at})")
    frr = m.threshold.frr
    if frr:
        target = f"target {frr['target']:.3g}, " if frr.get("target") is not None else ""
        typer.echo(f"  false-reject rate on normal parts: {target}expected {frr['expected']:.3g}, "
                   f"{frr['confidence']:.0%} upper bound {frr['upper']:.3g} ({frr['calibration_count']} calibration "
                   f"images)" + ("" if frr.get("reachable", True) else "; the target needs more calibration images"))
        if frr.get("excluded"):
            typer.echo(f"  {frr['excluded']} calibration images above the outlier cut {frr['outlier_cut']:.4g} left "
                       f"out as suspected defects; if they are normal parts the bound is {frr['upper_if_normal']:.3g}")
    measured = m.extra.get(VALIDATION_KEY)
    if measured and measured.get("threshold") == m.threshold.value:
        rates = [f"{name} {measured[key]:.3g} ({measured[count]} of {measured[total]})"
                 for name, key, count, total in (("false-reject rate", "false_reject_rate", "false_rejects", "normal"),
                                                 ("escape rate", "escape_rate", "escapes", "anomalous"))
                 if measured[key] is not None]
        typer.echo(f"  measured on {measured['source']}: " + ", ".join(rates))
    for name, spec in m.files.items():
        parity = spec.parity.get("passed")
        typer.echo(f"  {name}: {spec.path} [{spec.format} {spec.precision}] parity "
                   f"{'passed' if parity else 'n/a' if parity is None else 'FAILED'}")


@bundle_app.command("show")
def bundle_show(bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")]) -> None:
    """Verify a bundle's checksums and print its model, threshold and files."""
    from llb_edge.bundle import load_bundle

    try:
        show_bundle(load_bundle(bundle_dir))
    except USER_ERRORS as err:
        fail(str(err))


@bundle_app.command("set-threshold")
def bundle_set_threshold(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")],
    value: Annotated[float | None, typer.Argument(help="New decision threshold: score >= value is NG.")] = None,
    target_frr: Annotated[float | None, typer.Option(
        help="Instead of a value: the false-reject rate to calibrate for, on the bundle's calibration scores.")] = None,
    by: ActorOption = None,
) -> None:
    """Change the OK/NG threshold without re-exporting; the old value stays in the history.

    Give a value, or --target-frr to recompute it from the calibration scores the bundle carries.
    Either way the bundle records the false-reject rate its calibration images predict at the new
    value. A running daemon picks it up on reload (llb-edge ctl reload, or SIGHUP).
    """
    from llb_edge.bundle import load_bundle, set_threshold
    from llb_edge.calibration import bundle_calibration_scores, bundle_outlier_z, estimate_frr, threshold_for_target

    if (value is None) == (target_frr is None):
        fail("give either a threshold value or --target-frr")
    try:
        extra = load_bundle(bundle_dir, verify=False).manifest.extra
        calibration, outlier_z = bundle_calibration_scores(extra), bundle_outlier_z(extra)
        if target_frr is not None:
            if calibration is None:
                fail(f"{bundle_dir} carries no calibration scores (exported before they existed, or from a run "
                     "without a calibration slice): give a threshold value, or re-train and re-export")
            estimate = threshold_for_target(calibration, target_frr, outlier_z=outlier_z)
            bundle = set_threshold(bundle_dir, estimate.threshold, set_by=by, reason=f"operator: target FRR "
                                   f"{target_frr:g}", frr=estimate.to_dict())
        else:
            assert value is not None
            frr = (estimate_frr(calibration, value, outlier_z=outlier_z).to_dict() if calibration is not None
                   else None)
            bundle = set_threshold(bundle_dir, value, set_by=by, frr=frr)
    except USER_ERRORS as err:
        fail(str(err))
    t = bundle.manifest.threshold
    typer.echo(f"threshold of {bundle_dir} is now {t.value:.6g} (was {t.history[-1]['value']:.6g}), "
               f"set by {t.set_by} at {t.set_at}")
    if t.frr:
        excluded = (f"; {t.frr['excluded']} outliers left out as suspected defects, bound "
                    f"{t.frr['upper_if_normal']:.3g} if they are normal parts" if t.frr.get("excluded") else "")
        typer.echo(f"expected false-reject rate {t.frr['expected']:.3g} ({t.frr['confidence']:.0%} upper bound "
                   f"{t.frr['upper']:.3g}, {t.frr['calibration_count']} calibration images{excluded})")


@bundle_app.command("build-engine")
def bundle_build_engine(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder holding the ONNX graphs.")],
    engine: Annotated[str, typer.Option(help="tensorrt (GPU) | openvino (CPU variants).")] = "tensorrt",
    precision: Annotated[list[str] | None, typer.Option(
        help="tensorrt: fp16 (default) | fp32. openvino (repeatable): fp32, bf16, int8 (default: all three).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Engine and timing cache folder.")] = None,
) -> None:
    """Build engines on this machine from the bundle's ONNX and add them, gated.

    TensorRT: one engine, parity-gated against ONNX Runtime. OpenVINO: CPU variants, each added only
    if it passes the decision gate on the bundle's stored real images (docs/bundle.md); needs no torch.
    """
    try:
        if engine == "openvino":
            from llb_edge.exporters.openvino import add_openvino_variants
            from llb_edge.runtime.openvino_backend import PRECISIONS

            bundle, rejected = add_openvino_variants(bundle_dir, tuple(precision or PRECISIONS), cache_dir)
            show_bundle(bundle)
            if rejected:
                fail("rejected by the decision gate, not added: " + "; ".join(
                    f"{report.summary()} ({'; '.join(report.failures)})" for report in rejected.values()))
            return
        if engine != "tensorrt":
            fail(f"--engine must be tensorrt or openvino, got {engine!r}")
        if len(precision or []) > 1:
            fail("a TensorRT build takes one --precision")
        from llb_edge.exporters.bundle_export import add_tensorrt_engine

        show_bundle(add_tensorrt_engine(bundle_dir, precision=(precision or ["fp16"])[0], cache_dir=cache_dir))
    except USER_ERRORS as err:
        fail(str(err))


@bundle_app.command("add-torch-weights")
def bundle_add_torch_weights(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder exported from a run on this machine.")],
    weights: Annotated[str | None, typer.Option(help="The run's backbone weights file, if not at its path.")] = None,
) -> None:
    """Copy the run's model into the bundle (safetensors, checksummed) for --backend torch-cuda without the run."""
    from llb_edge.runtime.torch_backend import add_torch_weights

    try:
        show_bundle(add_torch_weights(bundle_dir, weights))
    except USER_ERRORS as err:
        fail(str(err))


@app.command()
def gateway(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Gateway TOML (see configs/).")] = None,
    results: Annotated[str | None, typer.Option(help="The daemon's results endpoint.")] = None,
    camera: Annotated[list[str] | None, typer.Option(help="Camera ids to drive (repeatable; default cam0).")] = None,
    opcua: Annotated[str | None, typer.Option(help="Serve tags on this OPC UA endpoint.")] = None,
    modbus_server: Annotated[str | None, typer.Option(help="Serve holding registers at HOST:PORT.")] = None,
    modbus_client: Annotated[str | None, typer.Option(help="Write holding registers to the PLC at HOST:PORT.")] = None,
    word_order: Annotated[str | None, typer.Option(help="Modbus float word order: big | little.")] = None,
    fail_safe_s: Annotated[float | None, typer.Option(help="Silence from the daemon that trips Fault.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG | INFO | WARNING.")] = DEFAULT_LOG_LEVEL,
) -> None:
    """Drive PLC tags (OPC UA, Modbus TCP, S7) from the daemon's results, with heartbeat and fail-safe."""
    from llb_edge.runtime.gateway import build_config, run_gateway

    try:
        settings = build_config(config, results, cameras=camera or (), opcua_endpoint=opcua,
                                modbus_server=modbus_server, modbus_client=modbus_client, word_order=word_order,
                                fail_safe_s=fail_safe_s)
    except USER_ERRORS as err:
        fail(str(err))
    raise typer.Exit(run_gateway(settings, log_level=log_level))


# ----------------------------------------------------------------------------- retraining (issue 7)

NotifyOption = Annotated[
    list[str] | None, typer.Option("--notify", help="Daemon control endpoint to hot-reload (repeatable).")
]


@app.command()
def retrain(
    pool: Annotated[Path | None, typer.Option(help="Capture pool folder (llb-edge serve --capture-pool).")] = None,
    versions: Annotated[Path | None, typer.Option(help="Versioned bundle folder to promote into.")] = None,
    current: Annotated[Path | None, typer.Option(help="Bundle to compare with (default: --versions' current).")] = (
        None),
    notify: NotifyOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option(help="Parent folder of retrain work folders.")] = Path("retrain"),
    holdout: Annotated[float | None, retrain_option(
        "holdout_fraction", "Fraction of the pool held back for the comparison.")] = None,
    seed: Annotated[int | None, retrain_option("seed", "Seed of the held-back slice.")] = None,
    max_ng_rate_change: Annotated[float | None, typer.Option(
        help="Gate: largest |NG-rate change| (default: docs/retrain.md).")] = None,
    max_disagreement: Annotated[float | None, typer.Option(
        help="Gate: largest fraction of changed decisions (default: docs/retrain.md).")] = None,
    max_labeled_drop: Annotated[float | None, typer.Option(
        help="Gate: largest drop of a metric on labelled frames (default: docs/retrain.md).")] = None,
    min_holdout: Annotated[int | None, typer.Option(
        help="Gate: fewest held-back frames to decide on (default: docs/retrain.md).")] = None,
    precision: Annotated[list[str] | None, retrain_option(
        "precisions", "Candidate ONNX precisions (repeatable).")] = None,
    backend: Annotated[str | None, retrain_option("backend", "Comparison backend: ort-cpu | ort-cuda.")] = None,
    no_promote: Annotated[bool, typer.Option("--no-promote", help="Decide and report only.")] = False,
    resume: Annotated[Path | None, typer.Option(
        help="A retrain work folder (OUT/retrain-VERSION) to continue where it stopped; on a finished one, "
             "decide again under the gate options given now.")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Retrain from the line: LLB on the capture pool, a candidate bundle, a comparison report, and
    promotion only if the gate passes. Exit code 1 when the gate fails or a daemon did not reload."""
    setup_logging(verbose)
    from llb_edge.config import apply_settings
    from llb_edge.retrain import retrain as run_retrain

    compared = current or versions
    if compared is None:
        fail("give --current BUNDLE_DIR or --versions ROOT (its current version is compared)")
    if pool is None and resume is None:
        fail("give --pool POOL_DIR (or --resume WORK_DIR to continue a cycle)")
    try:
        options = apply_settings(RETRAIN_DEFAULTS, given({
            "config": config, "overrides": overrides, "holdout_fraction": holdout, "seed": seed,
            "versions_root": versions, "notify_endpoints": notify, "promote_if_passed": False if no_promote else None,
            "precisions": precision, "backend": backend, "resume_dir": resume,
            "gate": {"max_ng_rate_change": max_ng_rate_change, "max_disagreement": max_disagreement,
                     "max_labeled_drop": max_labeled_drop, "min_holdout": min_holdout},
        }), COMMAND_LINE, text=True)
        decision = run_retrain(pool, compared, out, options)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"candidate {decision.candidate_version} vs current {decision.current_version}: gate "
               f"{'passed' if decision.passed else 'FAILED'}")
    for reason in decision.reasons:
        typer.echo(f"  {reason}")
    typer.echo(f"report: {decision.report_dir / 'report.html'}")
    change = decision.promotion
    if change is not None:
        show_version_change(change)
    elif decision.passed:
        typer.echo(f"not promoted; install with: llb-edge promote {versions or 'ROOT'} {decision.candidate_dir}")
    if not decision.passed or (change is not None and not change.all_reloaded):
        raise typer.Exit(1)


@app.command()
def label(
    pool: Annotated[Path, typer.Argument(help="Capture pool folder.")],
    frames: Annotated[list[str], typer.Argument(help="Frames: file name, or camera/frame_id.")],
    ok: Annotated[bool | None, typer.Option("--ok/--ng", help="Mark the frames OK or NG.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the frames' labels.")] = False,
    by: ActorOption = None,
) -> None:
    """Mark captured pool frames OK or NG (optional; used for evaluation only, never trained on)."""
    from llb_edge.trainer.label import label_frames

    if (ok is None) == (not clear):
        fail("give exactly one of --ok, --ng or --clear")
    try:
        done = label_frames(pool, frames, None if clear else ("OK" if ok else "NG"), by=by)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"{'cleared' if clear else 'OK' if ok else 'NG'}: {len(done)} frame(s)")


def show_version_change(change: VersionChange) -> None:
    typer.echo(f"{change.action}: {change.previous} -> {change.version} ({change.bundle_dir})")
    for endpoint, reply in change.notified.items():
        state = f"serves {reply.get('model_version')}" if reply.get("ok") else f"NOT reloaded: {reply.get('error')}"
        typer.echo(f"  {endpoint}: {state}")


@app.command()
def promote(
    root: Annotated[Path, typer.Argument(help="Versioned bundle folder.")],
    bundle: Annotated[Path, typer.Argument(help="Bundle to install as a new version.")],
    report: Annotated[Path | None, typer.Option(help="Report folder kept beside the version.")] = None,
    notify: NotifyOption = None,
    reason: ReasonOption = "manual promotion",
    by: ActorOption = None,
) -> None:
    """Install a bundle as the current version and hot-reload the daemons. Exit 1 if one did not reload."""
    from llb_edge.runtime.versions import promote as run_promote

    try:
        change = run_promote(root, bundle, report, notify or (), reason=reason, by=by)
    except USER_ERRORS as err:
        fail(str(err))
    show_version_change(change)
    if not change.all_reloaded:
        raise typer.Exit(1)


@app.command()
def rollback(
    root: Annotated[Path, typer.Argument(help="Versioned bundle folder.")],
    notify: NotifyOption = None,
    reason: ReasonOption = "manual rollback",
    by: ActorOption = None,
) -> None:
    """Return to the version promoted before the current one and hot-reload the daemons."""
    from llb_edge.runtime.versions import rollback as run_rollback

    try:
        change = run_rollback(root, notify or (), reason=reason, by=by)
    except USER_ERRORS as err:
        fail(str(err))
    show_version_change(change)
    if not change.all_reloaded:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="llb-edge")


if __name__ == "__main__":
    main()
