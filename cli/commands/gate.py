"""``diag baseline`` and ``diag check``: a CI gate that fails when a model is measurably sharper.

``diag baseline model.pt ... --out sharpness-baseline.json`` measures K seeded sharpness replicates
and stores them with their settings; ``diag check model.pt ... --baseline sharpness-baseline.json
--tolerance 0.10`` repeats them with the same seeds (paired) and exits 1 only when the one-sided
lower confidence bound of the sharpness ratio exceeds 1 + tolerance. Defaults may live in the
``[gate]`` table of diag.toml (replicates, samples, seed, tol, max_iter, tolerance, confidence).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from diag_cli.common import (
    BatchSizeOpt,
    CheckpointArg,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    LossOpt,
    ModelOpt,
    ParamsOpt,
    QuietOpt,
    SamplesOpt,
    SeedOpt,
    TrustOpt,
    handle_errors,
    pick,
    progress_bar,
    project_config,
    warn,
)
from diagnostics.binding import input_files, resolve_binding
from diagnostics.checkpoint import Checkpoint, load_checkpoint
from diagnostics.context import Context, build_context
from diagnostics.errors import DiagnosticsError, GateFailed
from diagnostics.gate import (
    GateSettings,
    baseline_settings,
    check_against_baseline,
    make_baseline,
    read_baseline,
    running_in_github_actions,
)
from diagnostics.outputs import plan_outputs
from diagnostics.results import atomic_write_bytes

GATE_TABLE = "gate"


def _gate_defaults(config: Path | None) -> dict[str, Any]:
    cfg = project_config(config)
    table = cfg.get(GATE_TABLE) or {}
    if not isinstance(table, dict):
        raise DiagnosticsError(f"[{GATE_TABLE}] in diag.toml must be a table")
    return {**{k: cfg[k] for k in ("seed", "samples", "batch_size", "dtype") if k in cfg}, **table}


def _pick(flag: Any, d: dict[str, Any], key: str, default: Any) -> Any:
    return flag if flag is not None else d.get(key, default)


def _full_context(
    path: Path,
    *,
    model: str | None,
    data: str | None,
    loss: str | None,
    config: Path | None,
    trust: bool,
    seed: int,
    batch_size: int | None,
    dtype: str | None,
    device: str | None,
    params: str | None,
) -> tuple[Checkpoint, Context]:
    """Checkpoint + binding -> a context over ALL the data (replicates draw their own subsets)."""
    cfg = project_config(config)
    ck = load_checkpoint(path)
    binding = resolve_binding(ck.factories, model=model, data=data, loss=loss, config=cfg, trust_checkpoint=trust)
    ctx = build_context(
        ck,
        binding,
        device=pick(device, cfg, "device"),
        dtype=dtype,
        seed=seed,
        samples=None,
        batch_size_=batch_size,
        params=pick(params, cfg, "params"),
    )
    return ck, ctx


@handle_errors
def baseline(
    checkpoint: CheckpointArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="baseline file to write (JSON)")],
    model: ModelOpt = None,
    data: DataOpt = None,
    loss: LossOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    replicates: Annotated[
        int | None, typer.Option("--replicates", "-K", help="seeded replicates K (default 5)")
    ] = None,
    seed: SeedOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchSizeOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    params: ParamsOpt = None,
    tol: Annotated[
        float | None, typer.Option("--tol", help="Lanczos relative residual tolerance (default 1e-4)")
    ] = None,
    max_iter: Annotated[int | None, typer.Option("--max-iter", help="Lanczos iteration cap (default 300)")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="stdout: table | json")] = "table",
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing baseline file")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure K seeded sharpness replicates (lambda_max) of a model and store them as the CI baseline.

    Replicate i uses seed SEED+i for its data subset (--samples) and Lanczos start vector; the seeds,
    subset hashes and settings are stored so 'diag check' can repeat the exact same measurement.
    """
    if format not in ("table", "json"):
        raise DiagnosticsError(f"unknown --format '{format}'; use table or json")
    plan_outputs(inputs=[checkpoint, *input_files(config, model, data, loss)], force=force, files={"--out": (out, ())})
    d = _gate_defaults(config)
    settings = GateSettings(
        replicates=int(_pick(replicates, d, "replicates", 5)),
        seed=int(_pick(seed, d, "seed", 0)),
        samples=_pick(samples, d, "samples", None),
        batch_size=_pick(batch_size, d, "batch_size", None),
        tol=float(_pick(tol, d, "tol", 1e-4)),
        max_iter=int(_pick(max_iter, d, "max_iter", 300)),
    )
    settings.validate()
    ck, ctx = _full_context(
        checkpoint,
        model=model,
        data=data,
        loss=loss,
        config=config,
        trust=trust_checkpoint_factories,
        seed=settings.seed,
        batch_size=settings.batch_size,
        dtype=_pick(dtype, d, "dtype", None),
        device=device,
        params=params,
    )
    with progress_bar(quiet) as progress:
        doc = make_baseline(ctx, settings, progress, checkpoint_sha256=ck.sha256)
    atomic_write_bytes(out, (json.dumps(doc, indent=2) + "\n").encode())
    if not quiet:
        for note in doc.get("notes") or []:
            warn(note)
    if format == "json":
        typer.echo(json.dumps(doc, indent=2))
        return
    s = doc["summary"]
    typer.echo(
        f"baseline: {ck.name}: sharpness (lambda_max) mean {s['mean']:.6g}, sd {s['sd']:.3g} over "
        f"K={settings.replicates} replicates (seeds {settings.seeds[0]}..{settings.seeds[-1]}, "
        f"{doc['replicates'][0]['samples']} samples each, {doc['settings']['dtype']}) -> {out}"
    )


@handle_errors
def check(
    checkpoint: CheckpointArg,
    baseline_file: Annotated[Path, typer.Option("--baseline", "-b", help="baseline written by 'diag baseline'")],
    model: ModelOpt = None,
    data: DataOpt = None,
    loss: LossOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    tolerance: Annotated[
        float | None,
        typer.Option("--tolerance", "-t", help="allowed relative increase of sharpness (default 0.10 = 10%)"),
    ] = None,
    confidence: Annotated[
        float | None, typer.Option("--confidence", help="one-sided confidence level (default 0.95)")
    ] = None,
    device: DeviceOpt = None,
    params: ParamsOpt = None,
    format: Annotated[str, typer.Option("--format", "-f", help="stdout: table (human summary) | json")] = "table",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="also write the result as JSON")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="write a JUnit XML report")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing --out/--junit files")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Exit 1 when CHECKPOINT is measurably sharper than the baseline (paired, one-sided test).

    The baseline's seeds and settings (data subsets, dtype, Lanczos tolerance) are reused, so each
    replicate compares the two models on the same data: d_i = log(new_i / base_i). The check fails
    iff mean(d) - t_{conf,K-1} sd(d)/sqrt(K) > log(1 + tolerance). Under GitHub Actions it also
    prints ::error/::notice annotations and appends to the job summary.
    """
    if format not in ("table", "json"):
        raise DiagnosticsError(f"unknown --format '{format}'; use table or json")
    plan_outputs(
        inputs=[checkpoint, baseline_file, *input_files(config, model, data, loss)],
        force=force,
        files={"--out": (out, ()), "--junit": (junit, ())},
    )
    d = _gate_defaults(config)
    tol_value = float(_pick(tolerance, d, "tolerance", 0.10))
    conf_value = float(_pick(confidence, d, "confidence", 0.95))
    doc = read_baseline(baseline_file)
    settings = baseline_settings(doc)
    _, ctx = _full_context(
        checkpoint,
        model=model,
        data=data,
        loss=loss,
        config=config,
        trust=trust_checkpoint_factories,
        seed=settings.seed,
        batch_size=settings.batch_size,
        dtype=doc["settings"].get("dtype"),
        device=device,
        params=params,
    )
    with progress_bar(quiet) as progress:
        report = check_against_baseline(ctx, doc, tolerance=tol_value, confidence=conf_value, progress=progress)
    payload = report.to_dict()
    if out is not None:
        atomic_write_bytes(out, (json.dumps(payload, indent=2) + "\n").encode())
    if junit is not None:
        atomic_write_bytes(junit, report.junit_xml().encode())
    if format == "json":
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(report.summary(), nl=False)
    if not quiet:
        for note in report.notes:
            warn(note)
    if running_in_github_actions():
        typer.echo(report.github_annotations(), nl=False)
        summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary_file:
            with open(summary_file, "a", encoding="utf-8") as fh:  # the runner's file, made for appending
                fh.write(report.step_summary_markdown())
    if not report.passed:
        raise GateFailed(report.headline())


def register(app: typer.Typer) -> None:
    app.command("baseline")(baseline)
    app.command("check")(check)
