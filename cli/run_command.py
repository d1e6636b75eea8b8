"""The body every analyzer command shares: options -> config -> planned outputs -> contexts -> run -> print/write.

Imported only when a command runs (never for ``--help``), so it may import the numerical stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diag_cli.errors import cli_errors
from diag_cli.factory import split_values
from diagnostics.errors import DiagnosticsError
from diagnostics.options import BindingOptions, OutputOptions, Project, ProjectOptions, find_config, parse_project
from diagnostics.spec import Analyzer, FileOutput, load_callable, resolve_config


def load_project(config: Path | None) -> Project:
    """``--config`` (or ``./diag.toml``) parsed and checked against the registered analyzers."""
    from diagnostics.analyzers.registry import all_analyzers

    return parse_project(find_config(config), tables=list(all_analyzers()))


def checkpoint_list(analyzer: Analyzer, given: Any) -> list[Path]:
    """The positional checkpoints as a list, their number checked against the declaration."""
    paths = list(given) if isinstance(given, (list, tuple)) else [given]
    lo, hi = analyzer.checkpoints
    if not lo <= len(paths) <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise DiagnosticsError(f"diag {analyzer.name} takes {want} checkpoint(s), got {len(paths)}")
    return [Path(p) for p in paths]


def requested_files(analyzer: Analyzer, values: dict[str, Any]) -> dict[str, tuple[FileOutput, Path]]:
    """The extra output files asked for: ``{name: (declaration, given path)}``."""
    return {fo.name: (fo, Path(values[fo.name])) for fo in analyzer.outputs if values.get(fo.name) is not None}


def analyzer_config(analyzer: Analyzer, values: dict[str, Any], project: Project) -> Any:
    """The analyzer's config: flags over the ``diag.toml`` table over defaults; asked-for files enable options."""
    fixed = {fo.enables: True for fo, _ in requested_files(analyzer, values).values() if fo.enables}
    return resolve_config(
        analyzer.config,
        flags=split_values(values, analyzer.config),
        table=project.table(analyzer.name),
        table_name=analyzer.name,
        fixed=fixed,
    )


def planned_files(
    analyzer: Analyzer, values: dict[str, Any], config: Any, inputs: list[Path], out: OutputOptions
) -> dict[str, dict[str, Path]]:
    """Every file the command will write, decided before anything is computed (see :mod:`diagnostics.outputs`)."""
    try:
        from diagnostics.outputs import plan_outputs
    except ImportError:  # until the output planner lands
        from diag_cli.common import check_out

        def plan_outputs(records, files, inputs, force):  # type: ignore[no-redef]
            for r in records:
                check_out(r, force, inputs)
            for f in files:
                if f.exists() and not force:
                    raise DiagnosticsError(f"'{f}' exists; pass --force to overwrite it")

    files = {name: fo.paths(path, config) for name, (fo, path) in requested_files(analyzer, values).items()}
    for name, (fo, path) in requested_files(analyzer, values).items():
        if fo.require_suffix and path.suffix.lower() != fo.require_suffix:
            raise DiagnosticsError(f"--{name.replace('_', '-')} '{path}' must end in {fo.require_suffix}")
    records = [out.out] if out.out is not None else []
    plan_outputs(
        records=records, files=[p for ps in files.values() for p in ps.values()], inputs=inputs, force=out.force
    )
    return files


def write_files(analyzer: Analyzer, result: Any, config: Any, files: dict[str, dict[str, Path]]) -> None:
    """Render and write the extra output files (after the records were printed)."""
    from diagnostics.results import atomic_write_bytes

    for name, paths in files.items():
        fo = next(f for f in analyzer.outputs if f.name == name)
        rendered = load_callable(fo.render)(result, config)
        for suffix, data in rendered.items():
            atomic_write_bytes(paths[suffix], data)


def run_command(analyzer: Analyzer, values: dict[str, Any]) -> None:
    """Run ``diag NAME`` with the parsed command-line ``values``."""
    with cli_errors(bool(values.get("debug"))):
        _run(analyzer, values, resolve_config(OutputOptions, flags=split_values(values, OutputOptions)))


def _run(analyzer: Analyzer, values: dict[str, Any], out: OutputOptions) -> None:
    from diag_cli.common import emit, progress_bar
    from diag_cli.resume import resume_store
    from diagnostics import distributed
    from diagnostics.runner import open_context, run_analyzer

    project_opts = resolve_config(ProjectOptions, flags=split_values(values, ProjectOptions))
    project = load_project(project_opts.config)
    binding = project.binding(split_values(values, BindingOptions))
    config = analyzer_config(analyzer, values, project)
    inputs = checkpoint_list(analyzer, values["checkpoints"])
    files = planned_files(analyzer, values, config, inputs, out)
    rank = distributed.init_from_env()
    trust = project_opts.trust_checkpoint_factories
    if len(inputs) == 2 and all(p.is_dir() for p in inputs) and _holds_checkpoints(inputs):
        result = _run_pairs(analyzer, config, inputs, binding, project, trust, values, out)
        if rank.is_main:
            emit(result, out.format, out.out, out.quiet)
            write_files(analyzer, result, config, files)
        return
    contexts = [open_context(p, binding, project, trust=trust, need_targets=analyzer.needs_targets) for p in inputs]
    with resume_store(analyzer, values, files, inputs, out.force) as resume:
        with progress_bar(out.quiet or not rank.is_main) as progress:
            result = run_analyzer(
                analyzer,
                config,
                contexts[0],
                progress,
                others=contexts[1:],
                resume=resume,
                replicates=binding.replicates,
                replicate_samples=binding.samples,
            )
        if rank.is_main:
            emit(result, out.format, out.out, out.quiet)
            write_files(analyzer, result, config, files)


def _holds_checkpoints(folders: list[Path]) -> bool:
    from diagnostics.runs import checkpoint_files

    try:
        return all(checkpoint_files(f) for f in folders)
    except DiagnosticsError:
        return False


def _run_pairs(
    analyzer: Analyzer,
    config: Any,
    runs: list[Path],
    binding: BindingOptions,
    project: Project,
    trust: bool,
    values: dict[str, Any],
    out: OutputOptions,
) -> Any:
    """Two run folders: the analyzer on every pair of checkpoints with the same step, one table of records.

    Records carry the first run's checkpoint (relative to its folder) and the step; table artifacts are
    concatenated with a ``step`` column; the metadata lists the pairs and each pair's own metadata.
    """
    from dataclasses import replace

    import pandas as pd

    from diag_cli.common import progress_bar
    from diagnostics.results import Result
    from diagnostics.runner import open_context, run_analyzer
    from diagnostics.runs import paired_checkpoints

    asked = [fo for fo, _ in requested_files(analyzer, values).values() if fo.enables]
    if asked:  # such a file holds the state of one pair of checkpoints
        flags = ", ".join("--" + fo.name.replace("_", "-") for fo in asked)
        raise DiagnosticsError(f"{flags} describes one pair of checkpoints; give two checkpoint files, not run folders")
    pairs, notes = paired_checkpoints(runs[0], runs[1])
    records, parts, tables = [], [], {}
    with progress_bar(out.quiet) as progress:
        for i, (a, b) in enumerate(pairs):
            ctx_a = open_context(a.path, binding, project, trust=trust, need_targets=analyzer.needs_targets)
            ctx_b = open_context(b.path, binding, project, trust=trust, need_targets=analyzer.needs_targets)
            res = run_analyzer(
                analyzer,
                config,
                ctx_a,
                progress,
                others=[ctx_b],
                replicates=binding.replicates,
                replicate_samples=binding.samples,
            )
            records += [replace(r, checkpoint=a.name, step=a.step) for r in res.records]
            meta = {k: v for k, v in res.metadata.items() if k not in ("versions", "binding", "config")}
            parts.append({"step": a.step, "a": a.name, "b": b.name, **meta})
            for name, df in res.artifacts.items():
                if isinstance(df, pd.DataFrame):
                    tables.setdefault(name, []).append(df.assign(step=a.step))
            if progress is not None:
                progress("pairs", i + 1, len(pairs))
    first = dict(res.metadata)
    metadata = {
        **{k: first[k] for k in ("analyzer", "config", "versions", "binding", "seed", "dtype", "device") if k in first},
        "runs": [str(r) for r in runs],
        "pairs": parts,
        "seconds": sum(float(p.get("seconds") or 0.0) for p in parts),
        "hvp_count": sum(int(p.get("hvp_count") or 0) for p in parts),
        "notes": list(dict.fromkeys([*notes, *(n for p in parts for n in p.get("notes") or [])])),
    }
    artifacts = {name: pd.concat(dfs, ignore_index=True) for name, dfs in tables.items()}
    return Result(records, metadata, artifacts)
