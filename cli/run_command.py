"""The body every analyzer command shares: options -> config -> planned outputs -> contexts -> run -> print/write.

Imported only when a command runs (never for ``--help``), so it may import the numerical stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diag_cli.errors import cli_errors
from diag_cli.factory import options_from, split_values
from diagnostics.binding import missing_factory_file
from diagnostics.errors import DiagnosticsError
from diagnostics.options import BindingOptions, OutputOptions, Project, ProjectOptions, find_config, parse_project
from diagnostics.spec import Analyzer, FileOutput, load_callable, resolve_config


def load_project(config: Path | None) -> Project:
    """``--config`` (or ``./diag.toml``) parsed and checked against the registered analyzers."""
    from diagnostics.analyzers.registry import all_analyzers

    return parse_project(find_config(config), tables=list(all_analyzers()))


def is_run_folder(path: Path) -> bool:
    """A folder of checkpoints (a run), as opposed to one checkpoint that is a folder: a ``save_pretrained`` or
    ``transformers.Trainer`` model folder (``checkpoint-N``) is a checkpoint."""
    from diagnostics.checkpoint import is_model_folder

    return path.is_dir() and not is_model_folder(path)


def checkpoint_list(analyzer: Analyzer, given: Any) -> list[Path]:
    """The positional checkpoints as a list, their number checked against the declaration."""
    paths = list(given) if isinstance(given, (list, tuple)) else [given]
    lo, hi = analyzer.checkpoints
    if not lo <= len(paths) <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise DiagnosticsError(f"diag {analyzer.name} takes {want} checkpoint(s), got {len(paths)}")
    return [Path(p) for p in paths]


def refuse_missing_inputs(checkpoints: list[Path], binding: BindingOptions) -> None:
    """A checkpoint, or a ``file.py`` factory of ``binding``, that does not exist: one line before torch is
    imported (a typo costs no second of start-up), with the message reading it would give."""
    from diagnostics.checkpoint import no_such_checkpoint

    for path in checkpoints:
        if not os.path.lexists(path):
            raise no_such_checkpoint(path)
    missing_factory_file(model=binding.model, data=binding.data, loss=binding.loss)


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


@dataclass
class Planned:
    """Every file a command will write: ``{output name: {suffix: path}}`` and the partial-work cache."""

    files: dict[str, dict[str, Path]]
    cache: Path | None = None
    cache_is_temporary: bool = False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def planned_files(
    analyzer: Analyzer,
    values: dict[str, Any],
    config: Any,
    inputs: list[Path],
    out: OutputOptions,
    project_opts: ProjectOptions,
    binding: BindingOptions,
) -> Planned:
    """Every file the command will write, decided and checked before anything is computed.

    See :func:`diagnostics.outputs.plan_outputs`: inputs (checkpoints, the project file, ``file.py`` factories)
    are never outputs, existing files need ``--force``, non-regular files are refused even with it, two outputs
    never share a path, and a partial-work cache is only ever one diag wrote.
    """
    from diag_cli.resume import FORMAT
    from diagnostics.binding import input_files
    from diagnostics.outputs import plan_outputs

    asked = requested_files(analyzer, values)
    single = {
        _flag(n): (p, (fo.require_suffix,) if fo.require_suffix else ())
        for n, (fo, p) in asked.items()
        if fo.paths(p, config).keys() == {""}
    }
    prefixes = {
        _flag(n): (fo.prefix(p, config), fo.suffix_list(config))
        for n, (fo, p) in asked.items()
        if _flag(n) not in single
    }
    resumable = None
    if analyzer.resumable:
        base = next((p for p, _ in single.values()), None)
        resumable = {"--cache": (values.get("cache"), base, FORMAT)}
    plan = plan_outputs(
        inputs=[*inputs, *input_files(project_opts.config, binding.model, binding.data, binding.loss)],
        force=out.force,
        out=out.out,
        files=single,
        prefixes=prefixes,
        resumable=resumable,
    )
    files = {n: plan.paths(_flag(n)) for n in asked}
    return Planned(files, plan.path("--cache"), plan.temporary("--cache"))


def write_files(analyzer: Analyzer, result: Any, config: Any, files: dict[str, dict[str, Path]]) -> None:
    """Render and write the extra output files (after the records were printed)."""
    from diagnostics.outputs import atomic_write_bytes

    for name, paths in files.items():
        fo = next(f for f in analyzer.outputs if f.name == name)
        rendered = load_callable(fo.render)(result, config)
        for suffix, data in rendered.items():
            atomic_write_bytes(paths[suffix], data)


def run_command(analyzer: Analyzer, values: dict[str, Any]) -> None:
    """Run ``diag NAME`` with the parsed command-line ``values``."""
    with cli_errors(bool(values.get("debug"))):
        _run(analyzer, values, options_from(OutputOptions, values))


@dataclass
class _Invocation:
    """What one ``diag NAME`` call resolved before any computation."""

    analyzer: Analyzer
    config: Any
    inputs: list[Path]
    binding: Any
    project: Project
    trust: bool
    out: OutputOptions
    planned: Any
    is_main: bool


def _run(analyzer: Analyzer, values: dict[str, Any], out: OutputOptions) -> None:
    project_opts = options_from(ProjectOptions, values)
    project = load_project(project_opts.config)
    binding = project.binding(split_values(values, BindingOptions))
    config = analyzer_config(analyzer, values, project)
    inputs = checkpoint_list(analyzer, values["checkpoints"])
    refuse_missing_inputs(inputs, binding)
    planned = planned_files(analyzer, values, config, inputs, out, project_opts, binding)
    from diagnostics import distributed  # torch: only once the arguments are known to be good

    is_main = distributed.init_from_env().is_main
    job = _Invocation(
        analyzer, config, inputs, binding, project, project_opts.trust_checkpoint_factories, out, planned, is_main
    )
    if len(inputs) == 2 and all(is_run_folder(p) for p in inputs):  # two runs: every pair of checkpoints of one step
        _refuse_pair_files(analyzer, values)
        _run_pairs(job)
    else:
        _run_checkpoints(job)


def _finish(job: _Invocation, result: Any) -> None:
    """Print or write the records and render the command's extra files (main rank only)."""
    from diag_cli.output import emit

    if job.is_main:
        emit(result, job.out.format, job.out.out, job.out.quiet)
        write_files(job.analyzer, result, job.config, job.planned.files)


def _run_pairs(job: _Invocation) -> None:
    """Two run folders: the analyzer on every pair of checkpoints of the same step."""
    from diag_cli.output import progress_bar, user_prints_to_stderr
    from diagnostics.runs import sweep_pairs

    with progress_bar(job.out.quiet or not job.is_main) as progress, user_prints_to_stderr():
        result = sweep_pairs(
            job.analyzer, job.config, job.inputs, job.binding, job.project.as_dict(), trust=job.trust, progress=progress
        )
    _finish(job, result)


def _run_checkpoints(job: _Invocation) -> None:
    """One checkpoint (plus the others the analyzer takes), resumable through the command's cache."""
    from diag_cli.output import progress_bar, user_prints_to_stderr
    from diag_cli.resume import resume_store
    from diagnostics.runner import open_context, run_analyzer

    a = job.analyzer
    with user_prints_to_stderr():  # a print in the user's model, data or loss code must not reach stdout
        contexts = [
            open_context(
                p, job.binding, job.project, trust=job.trust, need_targets=a.needs_targets, need_data=a.needs_data
            )
            for p in job.inputs
        ]
    with resume_store(a, job.planned.cache, job.planned.cache_is_temporary, job.out.force) as resume:
        with progress_bar(job.out.quiet or not job.is_main) as progress, user_prints_to_stderr():
            result = run_analyzer(
                a,
                job.config,
                contexts[0],
                progress,
                others=contexts[1:],
                resume=resume,
                replicates=job.binding.replicates,
                replicate_samples=job.binding.samples,
            )
        _finish(job, result)


def _refuse_pair_files(analyzer: Analyzer, values: dict[str, Any]) -> None:
    """An output file that holds the state of one pair (e.g. ``--save-aligned``) makes no sense for two runs."""
    asked = [fo for fo, _ in requested_files(analyzer, values).values() if fo.enables]
    if asked:
        flags = ", ".join("--" + fo.name.replace("_", "-") for fo in asked)
        raise DiagnosticsError(f"{flags} describes one pair of checkpoints; give two checkpoint files, not run folders")
