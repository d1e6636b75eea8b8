"""``diag baseline`` and ``diag check``: a CI gate that fails when a model is measurably sharper.

``diag baseline model.pt ... --out sharpness-baseline.json`` measures K seeded sharpness replicates and stores
them with their settings; ``diag check model.pt ... --baseline sharpness-baseline.json --tolerance 0.10`` repeats
them with the same seeds (paired) and exits 1 only when the one-sided lower confidence bound of the sharpness
ratio exceeds 1 + tolerance. Options are declared once (:class:`~diagnostics.gate.GateSettings`,
:class:`~diagnostics.gate.CheckOptions`, the shared binding options); defaults may live in the ``[gate]`` table
of diag.toml. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import typer

from diag_cli.errors import cli_errors, warn
from diag_cli.factory import checkpoint_argument, make_command, options_from, options_of, split_values, typer_parameter
from diagnostics.errors import DiagnosticsError, GateFailed
from diagnostics.gate import CheckOptions, GateSettings
from diagnostics.options import BindingOptions, Overwrite, PrintOptions, ProjectOptions
from diagnostics.spec import PANEL_OUTPUT, check_keys, option, params_of

TABLE = "gate"


@dataclass
class BaselineFile:
    """Where ``diag baseline`` writes (command line only)."""

    out: Path | None = option(
        None, help="baseline file to write (JSON; required)", short="-o", panel=PANEL_OUTPUT, toml=False
    )


@dataclass
class CheckFiles:
    """What ``diag check`` reads and writes besides the checkpoint (command line only)."""

    baseline: Path | None = option(None, help="baseline written by 'diag baseline' (required)", short="-b", toml=False)
    out: Path | None = option(None, help="also write the result as JSON", short="-o", panel=PANEL_OUTPUT, toml=False)
    junit: Path | None = option(None, help="write a JUnit XML report", panel=PANEL_OUTPUT, toml=False)


def gate_table(project: Any, cls: type) -> dict[str, Any]:
    """The ``[gate]`` table's values for ``cls`` (every key of the table must be a gate option)."""
    table = project.table(TABLE)
    check_keys(
        table, [p.name for c in (GateSettings, CheckOptions) for p in params_of(c)], f"[{TABLE}] in {project.where}"
    )
    names = {p.name for p in params_of(cls)}
    return {k: v for k, v in table.items() if k in names}


def _gate_options(config_cls: type, values: dict[str, Any], project: Any) -> Any:
    """Gate options: a flag wins over diag.toml's ``[gate]`` table, which wins over the default."""
    return options_from(config_cls, values, table=gate_table(project, config_cls), table_name=TABLE)


def _setup(values: dict[str, Any]) -> tuple[PrintOptions, Any, BindingOptions, bool]:
    """Print options (table or json), the project file, the binding options and the trust flag."""
    from diag_cli.run_command import load_project

    prints = options_from(PrintOptions, values)
    if prints.format not in ("table", "json"):
        raise DiagnosticsError(f"--format must be table or json for the gate, not '{prints.format}'")
    project_opts = options_from(ProjectOptions, values)
    project = load_project(project_opts.config)
    flags = {k: v for k, v in split_values(values, BindingOptions).items() if k != "replicates"}
    return prints, project, project.binding(flags), project_opts.trust_checkpoint_factories


def _context(values: dict[str, Any], project: Any, binding: BindingOptions, trust: bool, **overrides: Any) -> Any:
    """The checkpoint bound to its model over ALL the data (each replicate draws its own subset)."""
    from diagnostics.runner import open_context

    return open_context(Path(values["checkpoint"]), replace(binding, samples=None, **overrides), project, trust=trust)


def _plan(
    values: dict[str, Any], project: Any, binding: BindingOptions, files: dict[str, Path | None], *more: Path
) -> None:
    from diag_cli.run_command import refuse_missing_inputs
    from diagnostics.binding import input_files
    from diagnostics.outputs import plan_outputs

    refuse_missing_inputs([Path(values["checkpoint"])], binding)
    inputs = [Path(values["checkpoint"]), *more, *input_files(project.path, binding.model, binding.data, binding.loss)]
    force = options_from(Overwrite, values).force
    plan_outputs(inputs=inputs, force=force, files={k: (v, ()) for k, v in files.items()})


def baseline(values: dict[str, Any]) -> None:
    """``diag baseline`` with its parsed ``values``."""
    import json

    from diag_cli.output import progress_bar, user_prints_to_stderr
    from diagnostics.gate import make_baseline
    from diagnostics.outputs import atomic_write_bytes

    with cli_errors(bool(values.get("debug"))):
        prints, project, binding, trust = _setup(values)
        out = options_from(BaselineFile, values).out
        if out is None:
            raise DiagnosticsError("--out is required: the baseline file to write, e.g. --out sharpness-baseline.json")
        settings = _gate_options(GateSettings, values, project)
        settings = replace(settings, seed=binding.seed, samples=binding.samples, batch_size=binding.batch_size)
        _plan(values, project, binding, {"--out": out})
        ctx = _context(values, project, binding, trust)
        with progress_bar(prints.quiet) as progress, user_prints_to_stderr():
            doc = make_baseline(ctx, settings, progress, checkpoint_sha256=ctx.checkpoint_metadata.get("sha256"))
        atomic_write_bytes(out, (json.dumps(doc, indent=2) + "\n").encode())
        _print_baseline(doc, settings, out, prints)


def _print_baseline(doc: dict[str, Any], settings: GateSettings, out: Path, prints: PrintOptions) -> None:
    import json

    if not prints.quiet:
        for note in doc.get("notes") or []:
            warn(note)
    if prints.format == "json":
        typer.echo(json.dumps(doc, indent=2))
        return
    s = doc["summary"]
    typer.echo(
        f"baseline: {doc['checkpoint']['name']}: sharpness (lambda_max) mean {s['mean']:.6g}, sd {s['sd']:.3g} over "
        f"K={settings.replicates} replicates (seeds {settings.seeds[0]}..{settings.seeds[-1]}, "
        f"{doc['replicates'][0]['samples']} samples each, {doc['settings']['dtype']}) -> {out}"
    )


def check(values: dict[str, Any]) -> None:
    """``diag check`` with its parsed ``values``."""
    from diag_cli.output import progress_bar, user_prints_to_stderr
    from diagnostics.gate import (
        CHECK_REUSES,
        baseline_settings,
        check_against_baseline,
        read_baseline,
        refuse_changed_settings,
    )

    with cli_errors(bool(values.get("debug"))):
        prints, project, binding, trust = _setup(values)
        files = options_from(CheckFiles, values)
        if files.baseline is None:
            raise DiagnosticsError("--baseline is required: the file written by 'diag baseline'")
        opts = _gate_options(CheckOptions, values, project)
        _plan(values, project, binding, {"--out": files.out, "--junit": files.junit}, files.baseline)
        doc = read_baseline(files.baseline)
        refuse_changed_settings(doc, {name: values.get(name) for name in CHECK_REUSES})  # flags as given
        settings = baseline_settings(doc)
        ctx = _context(
            values,
            project,
            binding,
            trust,
            seed=settings.seed,
            batch_size=settings.batch_size,
            dtype=doc["settings"].get("dtype") or binding.dtype,
        )
        with progress_bar(prints.quiet) as progress, user_prints_to_stderr():
            report = check_against_baseline(
                ctx, doc, tolerance=opts.tolerance, confidence=opts.confidence, progress=progress
            )
        _report_check(report, files, prints)


def _report_check(report: Any, files: CheckFiles, prints: PrintOptions) -> None:
    """Write --out/--junit, print the summary (and GitHub annotations), exit 1 when the gate failed."""
    import json
    import os

    from diagnostics.gate import running_in_github_actions
    from diagnostics.outputs import atomic_write_bytes

    payload = report.to_dict()
    if files.out is not None:  # the files first: stdout may be a pipe whose reader stops early
        atomic_write_bytes(files.out, (json.dumps(payload, indent=2) + "\n").encode())
    if files.junit is not None:
        atomic_write_bytes(files.junit, report.junit_xml().encode())
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY") if running_in_github_actions() else None
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as fh:  # the runner's file, made for appending
            fh.write(report.step_summary_markdown())
    typer.echo(
        json.dumps(payload, indent=2) if prints.format == "json" else report.summary(), nl=prints.format == "json"
    )
    if not prints.quiet:
        for note in report.notes:
            warn(note)
    if running_in_github_actions():
        typer.echo(report.github_annotations(), nl=False)
    if not report.passed:
        raise GateFailed(report.headline())


def register(app: typer.Typer) -> None:
    """Add ``diag baseline`` and ``diag check``."""
    # the gate's own --replicates (GateSettings) replaces the analyzers' data replicates
    shared = [p for p in options_of(BindingOptions, ProjectOptions) if p.name != "replicates"]
    prints = options_of(PrintOptions, Overwrite)
    base = [
        checkpoint_argument(),
        *(typer_parameter(p) for p in [*shared, *options_of(GateSettings, BaselineFile), *prints]),
    ]
    chk = [
        checkpoint_argument(),
        *(typer_parameter(p) for p in [*shared, *options_of(CheckOptions, CheckFiles), *prints]),
    ]
    for name, fn, params, doc in (("baseline", baseline, base, BASELINE_HELP), ("check", check, chk, CHECK_HELP)):
        app.command(name, help=doc, short_help=doc.split("\n")[0])(make_command(name, fn, params, doc))


BASELINE_HELP = """Measure K seeded sharpness replicates (lambda_max) of a model and store them as the CI baseline.

Replicate i uses seed SEED+i for its data subset (--samples) and Lanczos start vector; the seeds, subset hashes
and settings are stored so 'diag check' can repeat the exact same measurement.
"""
CHECK_HELP = """Exit 1 when CHECKPOINT is measurably sharper than the baseline (paired, one-sided test).

The baseline's seeds and settings (data subsets, dtype, Lanczos tolerance) are reused, so each replicate
compares the two models on the same data: d_i = log(new_i / base_i). The check fails iff
mean(d) - t_{conf,K-1} sd(d)/sqrt(K) > log(1 + tolerance). Under GitHub Actions it also prints ::error/::notice
annotations and appends to the job summary. --seed, --samples, --batch-size and --dtype may be left out; given,
they must equal the baseline's (another value is an error, not ignored).
"""
