"""Run one analyzer: the single path the CLI, sweeps, the gate and the report share.

:func:`run_analyzer` calls the declared function, times it, and completes the result's metadata with what
every result carries (the context: checkpoint, step, seed, samples, dtype, device; the config; versions;
seconds); :class:`RunInfo` is the typed view of that metadata the report and sweeps read.

With ``replicates = K > 1`` the analysis is repeated on ``K`` disjoint seeded subsets of ``samples``
samples each, and each (metric, index, group) is reported as the mean over subsets with the standard
error across them, ``sd / sqrt(K)`` - the spread a Hessian measured on one small batch hides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from diagnostics.errors import DiagnosticsError
from diagnostics.spec import Analyzer, config_values

if TYPE_CHECKING:
    from diagnostics.context import Context
    from diagnostics.progress import ProgressFn
    from diagnostics.results import Result


@dataclass
class RunInfo:
    """What is known about how one result was computed (typed view of ``Result.metadata``).

    Attributes:
        analyzer: the analyzer's name.
        checkpoint, step: what was analysed.
        seed, samples, samples_available, n_params, dtype, device, loss: the context.
        config: the analyzer's option values.
        seconds: wall time of the analysis.
        hvp_count: Hessian-vector (or other operator) products spent.
        replicates: number of disjoint data subsets (1: all the data at once).
        notes: warnings for the user.
        lr, optimizer, step_source: from the checkpoint's metadata.
        versions: package versions.
        details: the analyzer's own metadata (e.g. ``eos`` with the threshold rule).
    """

    analyzer: str = ""
    checkpoint: str = ""
    step: int | None = None
    seed: int | None = None
    samples: int | None = None
    samples_available: int | None = None
    n_params: int | None = None
    dtype: str = ""
    device: str = ""
    loss: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    hvp_count: int = 0
    replicates: int = 1
    notes: list[str] = field(default_factory=list)
    lr: float | None = None
    optimizer: dict[str, Any] | None = None
    step_source: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> RunInfo:
        """Read the metadata dict of a result (known keys typed, the rest in ``details``)."""
        meta = dict(meta or {})
        ck_meta = meta.pop("checkpoint_metadata", None) or {}
        names = {f.name for f in fields(cls)} - {"details"}
        known = {k: meta.pop(k) for k in list(meta) if k in names and meta[k] is not None}
        for key in ("lr", "optimizer", "step_source"):
            known.setdefault(key, ck_meta.get(key))
        details = dict(meta.pop("details", None) or {})
        details.update(meta)
        info = cls(**known, details=details)
        info.notes = list(info.notes)
        return info

    def to_metadata(self) -> dict[str, Any]:
        """The metadata dict (``details`` merged at top level, as analyzers wrote it)."""
        out = asdict(self)
        details = out.pop("details")
        return {**details, **out}


def run_analyzer(
    analyzer: Analyzer,
    config: Any,
    ctx: Context,
    progress: ProgressFn | None = None,
    *,
    others: Sequence[Context] = (),
    resume: Any = None,
    replicates: int = 1,
    replicate_samples: int | None = None,
    warm: dict[str, Any] | None = None,
) -> Result:
    """Run ``analyzer`` on ``ctx`` and return its result with complete metadata.

    Args:
        analyzer: the declaration.
        config: its config (from :meth:`Analyzer.make_config`).
        ctx: the (first) checkpoint's context.
        progress: ``progress(task, done, total)``.
        others: further contexts, for analyzers taking several checkpoints.
        resume: a store of partial work, for resumable analyzers.
        replicates: ``K > 1`` runs on ``K`` disjoint seeded subsets of ``ctx``'s data (see module doc).
        replicate_samples: the size of each subset (None: ``N // K``); ``ctx`` must hold all the data.
        warm: for analyzers declaring ``warm_start`` whose config asks for it (``config.warm_start``), the
            sweep's scratch dict (see :class:`Analyzer`); not used with replicates (each subset starts cold).

    Returns:
        The :class:`~diagnostics.results.Result`; its metadata reads back with :meth:`RunInfo.from_metadata`.
    """
    lo, hi = getattr(analyzer, "checkpoints", (1, 1))
    if not lo <= 1 + len(others) <= hi:
        raise DiagnosticsError(f"{analyzer.name} takes {lo} to {hi} checkpoints, got {1 + len(others)}")
    if replicates > 1:
        return _run_replicates(analyzer, config, ctx, progress, replicates, replicate_samples, others)
    extras: dict[str, Any] = {}
    if hi > 1:
        extras["others"] = list(others)
    if getattr(analyzer, "resumable", False):
        extras["resume"] = resume
    if warm is not None and getattr(analyzer, "warm_start", False) and getattr(config, "warm_start", False):
        extras["warm"] = warm  # only when asked: a run function without warm starts never sees the keyword
    t0 = time.perf_counter()
    result = analyzer.run(config, ctx, progress, **extras)
    seconds = time.perf_counter() - t0
    result.metadata = _complete(result.metadata, analyzer, config, ctx, seconds)
    return result


def _complete(meta: Mapping[str, Any], analyzer: Analyzer, config: Any, ctx: Context, seconds: float) -> dict:
    from diagnostics.context import describe_context

    base = describe_context(ctx)
    notes = list(dict.fromkeys([*(base.get("notes") or []), *(meta.get("notes") or [])]))
    out = {**base, **dict(meta)}
    out.update(analyzer=analyzer.name, config=config_values(config), seconds=seconds, notes=notes)
    out.setdefault("hvp_count", 0)
    return out


def disjoint_subsets(ctx: Context, k: int, samples: int | None) -> list[Context]:
    """``k`` contexts on disjoint seeded subsets of ``ctx``'s data, ``samples`` samples each.

    Args:
        ctx: the context over all the data.
        k: the number of subsets.
        samples: the size of each (None: ``N // k``).

    Returns:
        ``k`` contexts sharing the model, batched like ``ctx``'s first batch.

    Raises:
        DiagnosticsError: the data holds fewer than ``k * samples`` samples.
    """
    import torch

    from diagnostics import batches as B
    from diagnostics.seeding import stream_generator

    n = ctx.n_samples
    if samples is None and k > n:  # N // K samples each: fewer than one
        raise DiagnosticsError(
            f"--replicates {k} splits the data into {k} disjoint subsets of {n} // {k} samples each (no --samples "
            f"given), which needs at least {k} samples but the data has {n}; lower --replicates to at most {n}"
        )
    each = samples or n // k
    if each < 1 or k * each > n:
        raise DiagnosticsError(
            f"--replicates {k} with --samples {each} needs {k * each} samples but the data has {n}; "
            "lower --replicates or --samples"
        )
    whole = B.concat(ctx.batches) if len(ctx.batches) > 1 else ctx.batches[0]
    order = torch.randperm(n, generator=stream_generator(ctx.seed, 7))
    per_batch = max(ctx.batch_sizes)
    out = []
    for r in range(k):
        idx = torch.sort(order[r * each : (r + 1) * each]).values
        out.append(ctx.with_batches(B.split(B.take(whole, idx), per_batch)))
    return out


def _run_replicates(
    analyzer: Analyzer,
    config: Any,
    ctx: Context,
    progress: ProgressFn | None,
    replicates: int,
    samples: int | None,
    others: Sequence[Context],
) -> Result:
    from diagnostics.results import Result

    subsets = disjoint_subsets(ctx, replicates, samples)
    parts = []
    for i, sub in enumerate(subsets):
        parts.append(run_analyzer(analyzer, config, sub, progress, others=others))
        if progress is not None:
            progress("replicates", i + 1, replicates)
    records = combine_replicates([p.records for p in parts])
    meta = dict(parts[0].metadata)
    meta.update(
        replicates=replicates,
        samples=subsets[0].n_samples,
        seconds=sum(p.metadata.get("seconds", 0.0) for p in parts),
        hvp_count=sum(int(p.metadata.get("hvp_count") or 0) for p in parts),
        replicate_values=[[r.to_dict() for r in p.records] for p in parts],
        notes=list(dict.fromkeys(n for p in parts for n in p.metadata.get("notes") or [])),
    )
    return Result(records, meta, parts[0].artifacts)


def combine_replicates(per_replicate: Sequence[Sequence[Any]]) -> list[Any]:
    """Records of ``K`` replicates -> one record per (metric, index, group): the mean, stderr ``sd/sqrt(K)``.

    A (metric, index, group) missing from some replicate is averaged over those that have it (stderr
    from those); with a single value the stderr is None.
    """
    from dataclasses import replace

    groups: dict[tuple, list[Any]] = {}
    for records in per_replicate:
        for r in records:
            groups.setdefault((r.metric, r.index, r.group), []).append(r)
    out = []
    for rs in groups.values():
        values = [r.value for r in rs]
        k = len(values)
        mean = math.fsum(values) / k
        stderr = None
        if k > 1:
            var = math.fsum((v - mean) ** 2 for v in values) / (k - 1)
            stderr = math.sqrt(var / k)
        out.append(replace(rs[0], value=mean, stderr=stderr))
    return out


def open_context(
    path: Any,
    binding: Any,
    project: Any,
    *,
    trust: bool = False,
    need_targets: bool = True,
    need_data: bool = True,
    content: Any = None,
) -> Context:
    """A checkpoint file (or model folder) bound to code and data -> :class:`~diagnostics.context.Context`.

    Args:
        path: the checkpoint.
        binding: :class:`~diagnostics.options.BindingOptions` (flags merged with ``diag.toml``).
        project: the parsed :class:`~diagnostics.options.Project` (or its flat dict): factory kwargs,
            trusted factories.
        trust: import factories named in the checkpoint (``--trust-checkpoint-factories``).
        need_targets: the data must carry targets.
        need_data: False for a data-free analysis: only the model is bound (no data factory is imported).
        content: the checkpoint's bytes when already read (a sweep analyses the bytes it hashed).

    Returns:
        The context; with ``binding.replicates > 1`` it holds all the data (the replicates draw subsets).
    """
    from diagnostics.binding import resolve_binding
    from diagnostics.checkpoint import load_checkpoint
    from diagnostics.context import build_context

    ck = load_checkpoint(path, content=content)
    bound = resolve_binding(
        ck.factories,
        model=binding.model,
        data=binding.data,
        loss=binding.loss,
        config=project.as_dict() if hasattr(project, "as_dict") else dict(project or {}),
        trust_checkpoint=trust,
        inputs=getattr(binding, "inputs", None),
        targets=getattr(binding, "targets", None),
        require=("model", "data") if need_data else ("model",),
    )
    return build_context(
        ck,
        bound,
        device=binding.device,
        dtype=binding.dtype,
        seed=binding.seed,
        samples=None if binding.replicates > 1 else binding.samples,
        batch_size_=binding.batch_size,
        params=binding.params,
        need_targets=need_targets and need_data,
        need_data=need_data,
    )
