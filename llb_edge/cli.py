"""The `llb-edge` command: dispatches to the trainer, exporters and runtime.

Heavy modules are imported inside each command so `llb-edge serve` on a line PC never needs torch.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

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


def fail(message: str) -> None:
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
    dataset: Annotated[str | None, typer.Option(help="mtd | mvtec | visa | realiad | folder | elpv.")] = None,
    category: Annotated[str | None, typer.Option(help="Category for multi-category datasets.")] = None,
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
    keep: Annotated[float | None, typer.Option(help="LLB stage 1: fraction of lowest-scored images kept.")] = None,
    submodel: Annotated[str | None, typer.Option(help="LLB stage 1 sub-model: dinomaly | knn.")] = None,
    submodel_iterations: Annotated[int | None, typer.Option(help="LLB stage 1: iterations per sub-model.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (same name) where it stopped.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the test-split evaluation at the end.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a model: LLB screening (stage 1) and the final Dinomaly model (stage 2), then evaluate it.

    Writes a run directory (config.json, metadata.json, model.safetensors, metrics.json, overlays/).
    """
    setup_logging(verbose)
    from llb_edge.config import ConfigError, load_config
    from llb_edge.runs import RunError, read_run_config

    flags = {
        "name": name, "out_dir": out_dir, "data.root": data, "data.dataset": dataset, "data.category": category,
        "model.weights": weights, "train.device": device, "train.precision": precision,
        "train.iterations": iterations, "llb.stages": stages, "llb.k": k, "llb.keep": keep,
        "llb.submodel": submodel, "llb.submodel_iterations": submodel_iterations,
    }
    settings = [f"{key}={value}" for key, value in flags.items() if value is not None] + list(overrides or [])
    try:
        cfg = load_config(config, settings)
        if resume and (cfg.run_dir / "config.json").exists():
            saved = read_run_config(cfg.run_dir)
            saved.train.device = cfg.train.device
            cfg = saved
        from llb_edge.trainer.pipeline import run_training

        run_dir = run_training(cfg, resume=resume, evaluate_after=not no_eval)
    except (ConfigError, RunError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"run directory: {run_dir}")
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        typer.echo(json.dumps(json.loads(metrics_path.read_text()), indent=2))


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    weights: Annotated[str | None, typer.Option(help="Backbone weights, if not at the path the run recorded.")] = None,
) -> None:
    """Evaluate a trained run on its test split; writes metrics.json and overlays/ into the run."""
    setup_logging(False)
    from llb_edge.runs import RunError
    from llb_edge.trainer.pipeline import run_evaluation

    try:
        metrics = run_evaluation(run_dir, device, weights)
    except (RunError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(json.dumps(metrics, indent=2))


def main() -> None:
    app(prog_name="llb-edge")


if __name__ == "__main__":
    sys.exit(main())
