"""``diag sharpness``: worst-case (SAM), adaptive (ASAM) and average-case sharpness; edge of stability."""

from __future__ import annotations

from typing import Annotated

import typer

from diag_cli.common import (
    BatchSizeOpt,
    CheckpointArg,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    FormatOpt,
    LossOpt,
    ModelOpt,
    OutOpt,
    ParamsOpt,
    QuietOpt,
    SamplesOpt,
    SeedOpt,
    TrustOpt,
    analyzer_defaults,
    check_format,
    emit,
    handle_errors,
    load_context,
    pick,
    progress_bar,
)
from diagnostics.analyzers.sharpness import SharpnessConfig, analyze_sharpness
from diagnostics.binding import input_files
from diagnostics.outputs import plan_outputs


@handle_errors
def sharpness(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    data: DataOpt = None,
    loss: LossOpt = None,
    config: ConfigOpt = None,
    trust_checkpoint_factories: TrustOpt = False,
    rho: Annotated[float | None, typer.Option("--rho", help="radius of the perturbation ball (default 0.05)")] = None,
    kind: Annotated[
        str | None,
        typer.Option("--kind", help="worst | adaptive | average, a comma-separated list, or all (default worst)"),
    ] = None,
    sigma: Annotated[
        float | None,
        typer.Option("--sigma", help="std of the Gaussian for --kind average (default rho/sqrt(#params))"),
    ] = None,
    draws: Annotated[
        int | None, typer.Option("--draws", help="antithetic Gaussian pairs for --kind average (default 100)")
    ] = None,
    restarts: Annotated[
        int | None, typer.Option("--restarts", help="starts of the projected gradient ascent (default 3)")
    ] = None,
    max_iter: Annotated[int | None, typer.Option("--max-iter", help="ascent steps per start (default 100)")] = None,
    tol: Annotated[
        float | None, typer.Option("--tol", help="stop when a step gains < tol x the sharpness (default 1e-7)")
    ] = None,
    adaptive_eta: Annotated[
        float | None, typer.Option("--adaptive-eta", help="eta of ASAM's T_w = |w| + eta (default 0.01)")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="learning rate for the thresholds (default: from the checkpoint)")
    ] = None,
    no_eos: Annotated[
        bool, typer.Option("--no-eos", help="skip the edge-of-stability figures (threshold, Adam's P^-1 H)")
    ] = False,
    eig_tol: Annotated[
        float | None, typer.Option("--eig-tol", help="Lanczos tolerance for lambda_max(P^-1 H) (default 1e-3)")
    ] = None,
    chunk: Annotated[
        int | None, typer.Option("--chunk", help="perturbed models per batched evaluation (default 32)")
    ] = None,
    seed: SeedOpt = None,
    samples: SamplesOpt = None,
    batch_size: BatchSizeOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    params: ParamsOpt = None,
    format: FormatOpt = "table",
    out: OutOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Sharpness at a checkpoint: max_{||e||<=rho} L(w+e) - L(w) (solved), ASAM, Gaussian; EoS thresholds."""
    check_format(format)
    plan_outputs(inputs=[checkpoint, *input_files(config, model, data, loss)], force=force, out=out)
    d = analyzer_defaults(config, "sharpness")
    cfg = SharpnessConfig(
        kind=pick(kind, d, "kind", "worst"),
        rho=pick(rho, d, "rho", 0.05),
        sigma=pick(sigma, d, "sigma", None),
        draws=pick(draws, d, "draws", 100),
        restarts=pick(restarts, d, "restarts", 3),
        max_iter=pick(max_iter, d, "max_iter", 100),
        tol=pick(tol, d, "tol", 1e-7),
        adaptive_eta=pick(adaptive_eta, d, "adaptive_eta", 0.01),
        eos=not no_eos and bool(d.get("eos", True)),
        lr=lr,
        eig_tol=pick(eig_tol, d, "eig_tol", 1e-3),
        chunk=pick(chunk, d, "chunk", 32),
    )
    cfg.validate()
    _, ctx = load_context(
        checkpoint,
        model=model,
        data=data,
        loss=loss,
        config=config,
        trust=trust_checkpoint_factories,
        seed=seed,
        samples=samples,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        params=params,
    )
    with progress_bar(quiet) as progress:
        result = analyze_sharpness(cfg, ctx, progress)
    emit(result, format, out, quiet)


def register(app: typer.Typer) -> None:
    app.command("sharpness")(sharpness)
