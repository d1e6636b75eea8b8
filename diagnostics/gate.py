"""CI regression gate on sharpness: a stored baseline and a paired, one-sided check.

**Measurement.** Sharpness is ``lambda_max`` of the loss Hessian (Lanczos with full
reorthogonalisation, stopped when the eigenvalue error bound is below ``tol`` relative). One *replicate* ``i`` uses seed
``s_i``: a seeded data subset of ``samples`` samples (all data when ``samples`` is None) and a seeded
Lanczos start vector, both from random stream 0 of ``s_i`` -- exactly what
``diag hessian --seed s_i --samples n --tol tol`` measures. ``K`` replicates give ``K`` numbers.

**Baseline.** :func:`make_baseline` stores every replicate measurement with its settings: seeds,
the SHA-256 of each replicate's data subset, sample counts, dtype, Lanczos tolerance, the parameter
layout and the package versions, plus ``checksum``, the SHA-256 of the canonical JSON of everything
else (:func:`baseline_checksum`). :func:`read_baseline` refuses a file whose content no longer matches
it: a baseline edited by hand (e.g. halved, which would make any model look 2x sharper) is refused
with a line saying how to regenerate it, instead of failing or passing the gate.

**Check (paired).** :func:`check_against_baseline` measures the candidate with the *same* seeds, so
replicate ``i`` of the candidate sees the same data subset and start vector as replicate ``i`` of the
baseline (subset hashes are compared; a changed dataset is an error, not a regression). With
``d_i = log(new_i / base_i)``, ``mean`` and ``sd`` (``ddof=1``) of the ``d_i`` and the one-sided
Student-t quantile ``t = t_{conf, K-1}``::

    LCB = mean(d) - t * sd(d) / sqrt(K)
    fail  <=>  LCB > log(1 + tolerance)

i.e. the gate fails only when it is confident (level ``conf``, default 0.95) that the candidate is
more than ``tolerance`` sharper than the baseline. When every ``d_i`` is equal (``sd = 0``) the bound
is ``mean(d)`` itself. Pairing removes the subset-to-subset variation that both models share, so far
fewer replicates are needed than for two independent samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diagnostics.analyzers.hessian import SCALE_OPTIONS, HessianConfig, ScaleOptions, build_operator, run_lanczos
from diagnostics.batches import fingerprint
from diagnostics.errors import DiagnosticsError
from diagnostics.lazy import lazy_from, lazy_import
from diagnostics.options import DTYPES
from diagnostics.results import finite_or_none, package_versions, strict_json
from diagnostics.seeding import stream_generator
from diagnostics.spec import check_config, option

if TYPE_CHECKING:
    from diagnostics.context import Batch, Context
    from diagnostics.progress import ProgressFn

torch = lazy_import("torch")
describe_context, prepare_batches = lazy_from("diagnostics.context", "describe_context", "prepare_batches")
unconverged_fix = lazy_from("diagnostics.linalg.lanczos", "unconverged_fix")

MAX_REPLICATES = 1000  # each replicate is a full Lanczos run; beyond this the t bound no longer narrows
BASELINE_FORMAT = "diagnostics-sharpness-baseline/2"  # 2: data subsets hashed by diagnostics.batches.fingerprint
METRIC = "eigenvalue_0 (lambda_max of the loss Hessian, Lanczos)"


# ------------------------------------------------------------------------------------ settings
@dataclass
class GateSettings(ScaleOptions):
    """How sharpness is measured (stored in the baseline; the check reuses it unchanged).

    The options (``[gate]`` in diag.toml, flags of ``diag baseline``) are the replicate count, the Lanczos
    tolerance and cap, and the scale options of ``diag hessian`` (:class:`ScaleOptions`, the same
    declarations). ``seed``, ``samples`` and ``batch_size`` come from the shared data options.

    Attributes:
        replicates: ``K``, the number of seeded replicates (>= 2 for a confidence bound, at most
            :data:`MAX_REPLICATES`).
        tol: Lanczos relative tolerance on the eigenvalue error bound (as ``diag hessian --tol``).
        max_iter: Lanczos iteration cap.
        seed: replicate ``i`` uses seed ``seed + i``.
        samples: size of each replicate's seeded data subset (None: all data, only the start
            vector varies).
        batch_size: re-batch each subset (the Hessian does not depend on it; memory does).
    """

    replicates: int = option(5, help="seeded sharpness replicates K", short="-K", min=2, max=MAX_REPLICATES)
    tol: float = option(
        1e-4, help="Lanczos tolerance of each replicate's lambda_max", min=0, max=1, min_open=True, max_open=True
    )
    max_iter: int = option(300, help="Lanczos iteration cap", min=1)
    seed: int = 0
    samples: int | None = None
    batch_size: int | None = None

    def validate(self) -> None:
        """The fields without a declaration (read back from a baseline file) have the right types and ranges."""
        kinds = {"seed": (int,), "samples": (int, type(None)), "batch_size": (int, type(None))}
        for name, allowed in kinds.items():
            value = getattr(self, name)
            if not isinstance(value, allowed) or isinstance(value, bool):
                what = "a whole number" + (" or null" if type(None) in allowed else "")
                raise DiagnosticsError(f"settings.{name} is {value!r}, expected {what}")
        if self.samples is not None and self.samples < 1:
            raise DiagnosticsError(f"--samples must be positive, got {self.samples}")
        if self.batch_size is not None and self.batch_size < 1:
            raise DiagnosticsError(f"--batch-size must be positive, got {self.batch_size}")
        super().validate()

    @property
    def seeds(self) -> list[int]:
        """The replicate seeds ``seed, seed + 1, ..., seed + K - 1``."""
        return [int(self.seed) + i for i in range(int(self.replicates))]


@dataclass
class CheckOptions:
    """How ``diag check`` decides (``[gate]`` in diag.toml beside the :class:`GateSettings` options)."""

    tolerance: float = option(
        0.10, help="allowed relative increase of sharpness (0.10 = 10%)", short="-t", min=0, min_open=True
    )
    confidence: float = option(0.95, help="one-sided confidence level of the test", min=0.5, max=1, max_open=True)


@dataclass
class Replicate:
    """One sharpness measurement."""

    seed: int
    subset_sha256: str
    samples: int
    sharpness: float
    residual: float
    iterations: int
    converged: bool
    floor_tol: float = 0.0  # the tolerance the rounding floor allowed where it exceeded tol (LanczosResult)


# -------------------------------------------------------------------------------- measurement
def subset_sha256(batches: Sequence[Batch]) -> str:
    """SHA-256 of the samples of ``batches`` in order, however they are batched (see :func:`diagnostics.batches.fingerprint`)."""
    return fingerprint(batches, ignore_batching=True)


def parameter_layout(ctx: Context) -> dict[str, Any]:
    """Names and shapes of the analysed parameters (and a hash of them)."""
    layout = [[n, list(t.shape)] for n, t in ctx.params.items()]
    digest = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
    return {"n_params": ctx.n_params, "n_tensors": len(layout), "sha256": digest}


def replicate_batches(ctx: Context, seed: int, settings: GateSettings) -> list[Batch]:
    """The data subset of replicate ``seed``: ``samples`` samples drawn with stream 0 of ``seed``."""
    if settings.samples is None or settings.samples >= ctx.n_samples:
        if settings.batch_size is None:
            return list(ctx.batches)
        return prepare_batches(list(ctx.batches), batch_size_=settings.batch_size, where="data").batches
    prepared = prepare_batches(
        list(ctx.batches),
        samples=settings.samples,
        batch_size_=settings.batch_size,
        generator=stream_generator(seed, 0),
        where="data",
    )
    return prepared.batches


def _comb_at_least(n: int, r: int, k: int) -> bool:
    """Whether ``C(n, r) >= k``, without computing a huge binomial coefficient (stops once it reaches ``k``)."""
    r = min(r, n - r)
    c = 1
    for i in range(r):
        if c >= k:
            return True
        c = c * (n - i) // (i + 1)
    return c >= k


def check_replicates_fit(settings: GateSettings, n_samples: int) -> None:
    """Refuse more replicates than there are distinct data subsets of ``settings.samples`` samples.

    Each replicate draws its own seeded subset of ``samples`` of the ``n_samples`` samples (subsets of
    different replicates may overlap; they need not be disjoint). With more replicates ``K`` than the
    ``C(n, samples)`` distinct subsets, some subset is measured twice: a repeated measurement, not a new
    replicate, which would make the check's confidence bound too narrow. With ``samples`` None or at least
    ``n_samples`` every replicate measures all the data (only the Lanczos start vector varies): any ``K`` fits.

    Raises:
        DiagnosticsError: naming ``--replicates``, ``--samples``, the data size and the fix.
    """
    k, s, n = int(settings.replicates), settings.samples, int(n_samples)
    if s is None or s >= n or _comb_at_least(n, s, k):
        return
    distinct = math.comb(n, s)  # < k <= MAX_REPLICATES: small
    raise DiagnosticsError(
        f"--replicates {k} with --samples {s} needs {k} different subsets of {s} sample{'s' if s != 1 else ''}, "
        f"but the data has {n} samples and so only {distinct} such subsets; lower --replicates to at most "
        f"{distinct} or raise --samples"
    )


def measure_sharpness(
    ctx: Context,
    settings: GateSettings,
    progress: ProgressFn | None = None,
) -> list[Replicate]:
    """``K`` seeded sharpness replicates of the model in ``ctx`` (``ctx`` holds all the data).

    Each replicate is ``lambda_max`` measured exactly as ``diag hessian --top-k 1`` measures it
    (:func:`diagnostics.analyzers.hessian.build_operator` and ``run_lanczos``), so the scale options
    of ``settings`` that ``diag hessian`` has (``SCALE_OPTIONS``: backend, max_vectors, micro_batch,
    autocast, accumulate_dtype, compile, basis_device, block_size) apply the same way.
    """
    settings.validate()
    scale = {name: getattr(settings, name) for name in SCALE_OPTIONS if hasattr(settings, name)}
    config = check_config(HessianConfig(top_k=1, tol=settings.tol, max_iter=settings.max_iter, **scale))
    out = []
    seeds = settings.seeds
    for i, seed in enumerate(seeds):
        batches = replicate_batches(ctx, seed, settings)
        sub = ctx.with_batches(batches)
        res = run_lanczos(build_operator(sub, config), config, stream_generator(seed, 0))
        out.append(
            Replicate(
                seed=seed,
                subset_sha256=subset_sha256(batches),
                samples=sub.n_samples,
                sharpness=float(res.eigenvalues[0]),
                residual=float(res.residuals[0]),
                iterations=int(res.iterations),
                converged=bool(res.converged),
                floor_tol=float(res.floor_tol),
            )
        )
        if progress is not None:
            progress("replicates", i + 1, len(seeds))
    return out


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    k = len(values)
    mean = sum(values) / k
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1)) if k > 1 else 0.0
    return mean, sd


# ----------------------------------------------------------------------------------- baseline
def baseline_checksum(doc: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of a baseline without its ``checksum`` key.

    Canonical JSON is independent of indentation and key order, and Python's float repr round-trips
    exactly through JSON, so re-serialising an unchanged baseline keeps its checksum.
    """
    body = {k: v for k, v in doc.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def make_baseline(
    ctx: Context,
    settings: GateSettings,
    progress: ProgressFn | None = None,
    checkpoint_sha256: str | None = None,
) -> dict[str, Any]:
    """Measure ``K`` replicates on the baseline model -> the baseline document (JSON-ready).

    Raises:
        DiagnosticsError: before any measurement, settings that do not fit the data (:func:`check_replicates_fit`).
    """
    t0 = time.perf_counter()
    check_config(settings)  # declared ranges too (--replicates at most MAX_REPLICATES), as flags would be
    check_replicates_fit(settings, ctx.n_samples)
    reps = measure_sharpness(ctx, settings, progress)
    values = [r.sharpness for r in reps]
    mean, sd = _mean_sd(values)
    info = describe_context(ctx)
    notes = list(info.get("notes") or [])
    if not all(r.converged for r in reps):
        fix = unconverged_fix(max(r.floor_tol for r in reps), ctx.dtype)
        notes.append(f"Lanczos did not reach tol={settings.tol} in every replicate: {fix}")
    doc = {
        "format": BASELINE_FORMAT,
        "metric": METRIC,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": {
            "name": ctx.checkpoint,
            "step": ctx.step,
            "lr": ctx.lr,
            "sha256": checkpoint_sha256,
        },
        "settings": {**asdict(settings), "seeds": settings.seeds, "dtype": info["dtype"]},
        "data": {
            "samples_available": ctx.n_samples,
            "loss": ctx.loss_name,
            "binding": ctx.binding,
        },
        "parameters": parameter_layout(ctx),
        "replicates": [asdict(r) for r in reps],
        "summary": {"mean": mean, "sd": sd, "min": min(values), "max": max(values)},
        "device": info["device"],
        "seconds": time.perf_counter() - t0,
        "notes": notes,
        "versions": package_versions(),
    }
    # exactly what a reader of the file will see; strict JSON (a non-finite number, e.g. an infinite residual,
    # is null) so that any JSON parser reads the baseline
    doc = json.loads(strict_json(doc))
    doc["checksum"] = baseline_checksum(doc)
    return doc


def _bad(path: str, why: str) -> DiagnosticsError:
    return DiagnosticsError(f"'{path}' is not a valid sharpness baseline ({why}); create one with 'diag baseline'")


def _check_replicates(reps: list[Any], settings: dict[str, Any], path: str) -> None:
    """Each replicate: a finite positive sharpness, the seed the settings list for it and its data-subset hash;
    the seeds are ``seed, seed + 1, ...`` as :attr:`GateSettings.seeds` makes them."""
    seeds = settings.get("seeds")
    if not isinstance(seeds, list) or len(seeds) != len(reps) or len(reps) != settings.get("replicates"):
        raise _bad(path, "the seeds, replicates and their count disagree")
    first = settings.get("seed", 0)
    if isinstance(first, int) and not isinstance(first, bool) and seeds != [first + i for i in range(len(seeds))]:
        raise _bad(path, f"settings.seeds {seeds[:4]} do not follow settings.seed {first} (seed, seed + 1, ...)")
    for i, r in enumerate(reps):
        if not isinstance(r, dict):
            raise _bad(path, f"replicate {i} is not an object")
        value = r.get("sharpness")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise _bad(path, f"replicate {i} has no finite 'sharpness'")
        if value <= 0:
            raise _bad(
                path,
                f"replicate {i} has sharpness {value:.6g} <= 0, which cannot anchor the log-ratio test; "
                "measure the baseline on a trained checkpoint",
            )
        if r.get("seed") != seeds[i] or not isinstance(r.get("subset_sha256"), str):
            raise _bad(path, f"replicate {i} lacks its seed or data-subset hash")


def _check_sizes(doc: Mapping[str, Any], path: str) -> None:
    """The analysis dtype is one diag runs in, and each replicate measured ``min(samples, available)`` samples."""
    settings, data = doc["settings"], doc["data"]
    dtype = settings.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise _bad(path, f"settings.dtype is {dtype!r}, expected one of {', '.join(DTYPES)}")
    samples, available = settings.get("samples"), data.get("samples_available")
    if not (isinstance(samples, int) and isinstance(available, int)) or isinstance(available, bool):
        return
    expected = min(samples, available)
    for i, r in enumerate(doc["replicates"]):
        got = r.get("samples")
        if isinstance(got, int) and got != expected:
            raise _bad(
                path,
                f"replicate {i} measured {got} samples, but settings.samples {samples} of "
                f"{available} available means {expected}",
            )


def _check_parameters(params: dict[str, Any], path: str) -> None:
    """The ``parameters`` section: the names-and-shapes hash and whole-number counts."""
    digest = params.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise _bad(path, "no parameters.sha256, the hash of the analysed parameters' names and shapes")
    for key in ("n_params", "n_tensors"):
        if not isinstance(params.get(key), int) or isinstance(params.get(key), bool):
            raise _bad(path, f"parameters.{key} is not a whole number")


def validate_baseline(doc: Any, path: str = "baseline") -> dict[str, Any]:
    """Check a baseline document's structure; return it. Raises :class:`DiagnosticsError` if corrupt."""
    if not isinstance(doc, dict):
        raise _bad(path, f"a JSON {type(doc).__name__}, not an object")
    fmt = doc.get("format")
    if fmt != BASELINE_FORMAT:
        if isinstance(fmt, str) and fmt.startswith("diagnostics-sharpness-baseline/"):
            raise DiagnosticsError(
                f"'{path}' is a baseline of format {fmt}, this diag reads {BASELINE_FORMAT}; recreate it with 'diag baseline'"
            )
        raise _bad(path, f"format is {fmt!r}, expected {BASELINE_FORMAT!r}")
    settings = doc.get("settings")
    reps = doc.get("replicates")
    if not isinstance(settings, dict) or not isinstance(reps, list):
        raise _bad(path, "no 'settings' or 'replicates'")
    try:
        check_config(GateSettings(**{k: settings[k] for k in asdict(GateSettings()) if k in settings}), "settings")
    except (TypeError, DiagnosticsError) as exc:
        raise _bad(path, str(exc)) from exc
    _check_replicates(reps, settings, path)
    if not isinstance(doc.get("parameters"), dict) or not isinstance(doc.get("data"), dict):
        raise _bad(path, "no 'parameters' or 'data' section")
    _check_parameters(doc["parameters"], path)
    _check_sizes(doc, path)
    return doc


def read_baseline(path: str | Path) -> dict[str, Any]:
    """Read and validate a baseline file."""
    path = Path(path)
    if not path.is_file():
        raise DiagnosticsError(f"no such baseline file: '{path}'; create it with 'diag baseline ... --out {path}'")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _bad(str(path), f"not JSON: {exc}") from exc
    validate_baseline(doc, str(path))
    regenerate = f"regenerate it with 'diag baseline CKPT ... --out {path} --force'"
    recorded = doc.get("checksum")
    if not isinstance(recorded, str):
        raise DiagnosticsError(f"'{path}' has no checksum (written by an older diag, or edited): {regenerate}")
    if recorded != baseline_checksum(doc):
        raise DiagnosticsError(
            f"'{path}' was modified after 'diag baseline' wrote it (its checksum does not match its content): "
            f"{regenerate}"
        )
    return doc


def baseline_settings(doc: Mapping[str, Any]) -> GateSettings:
    """The measurement settings stored in a baseline document.

    Args:
        doc: a baseline document whose checksum was verified (it has a ``settings`` table).

    Returns:
        :class:`GateSettings` from the known keys of ``doc["settings"]``; unknown keys are ignored and
        missing ones take their defaults.
    """
    s = doc["settings"]
    return GateSettings(**{k: s[k] for k in asdict(GateSettings()) if k in s})


# -------------------------------------------------------------------------------------- check
@dataclass
class GateReport:
    """The outcome of a check (everything the summary, JSON, JUnit and annotations show)."""

    passed: bool
    tolerance: float
    confidence: float
    replicates: int
    mean_log_ratio: float
    sd_log_ratio: float
    t_quantile: float
    lower_bound: float
    upper_bound: float
    threshold: float
    baseline_mean: float
    candidate_mean: float
    log_ratios: list[float]
    baseline: list[float]
    candidate: list[float]
    seeds: list[int]
    checkpoint: str
    baseline_checkpoint: str
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Point estimate of new/base sharpness, ``exp(mean(d))``."""
        return math.exp(self.mean_log_ratio)

    @property
    def ratio_lower(self) -> float:
        """Lower confidence bound of new/base sharpness, ``exp(mean(d) - t sd(d) / sqrt(K))``."""
        return math.exp(self.lower_bound)

    @property
    def ratio_upper(self) -> float:
        """Upper confidence bound of new/base sharpness, ``exp(mean(d) + t sd(d) / sqrt(K))``."""
        return math.exp(self.upper_bound)

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``verdict``, the ratio and its bounds, ``fail_above_ratio`` and the rule, JSON-ready."""
        out = asdict(self)
        out.update(
            verdict="pass" if self.passed else "fail",
            ratio=self.ratio,
            ratio_lower=self.ratio_lower,
            ratio_upper=self.ratio_upper,
            fail_above_ratio=1 + self.tolerance,
            rule=f"fail iff mean(d) - t_{{{self.confidence:g},K-1}} * sd(d)/sqrt(K) > log(1 + tolerance), "
            "d_i = log(candidate_i / baseline_i)",
        )
        return finite_or_none(out)  # strict JSON: a non-finite bound is null

    def headline(self) -> str:
        """One line: PASS or FAIL, the sharpness ratio, its lower bound and the allowed ratio ``1 + tolerance``."""
        word = "PASS" if self.passed else "FAIL"
        return (
            f"sharpness gate {word}: {self.checkpoint} is {self.ratio:.3f}x the baseline's sharpness "
            f"({self.confidence:.0%} lower bound {self.ratio_lower:.3f}x, "
            f"{'at or below' if self.passed else 'above'} the allowed {1 + self.tolerance:.3f}x)"
        )

    def summary(self) -> str:
        """A human summary for the terminal."""
        lines = [
            self.headline(),
            "",
            f"  baseline   {self.baseline_checkpoint}: mean sharpness {self.baseline_mean:.6g}",
            f"  candidate  {self.checkpoint}: mean sharpness {self.candidate_mean:.6g}",
            f"  ratio      {self.ratio:.4f}  one-sided {self.confidence:.0%} bounds "
            f"[{self.ratio_lower:.4f}, {self.ratio_upper:.4f}]",
            f"  rule       fail iff lower bound > 1 + tolerance = {1 + self.tolerance:.4f} "
            f"(K={self.replicates} paired replicates, t={self.t_quantile:.3f})",
            "",
            "  replicate  seed  baseline     candidate    log-ratio",
        ]
        for i, (s, b, c, d) in enumerate(zip(self.seeds, self.baseline, self.candidate, self.log_ratios)):
            lines.append(f"  {i:>9}  {s:>4}  {b:<11.6g}  {c:<11.6g}  {d:+.4f}")
        return "\n".join(lines) + "\n"

    def junit_xml(self) -> str:
        """A JUnit XML document with one test case (failed when the gate failed)."""
        suite = ET.Element(
            "testsuite",
            name="diag.sharpness-gate",
            tests="1",
            failures="0" if self.passed else "1",
            errors="0",
            skipped="0",
            time=f"{self.seconds:.3f}",
        )
        props = ET.SubElement(suite, "properties")
        for key in ("tolerance", "confidence", "replicates", "mean_log_ratio", "lower_bound", "threshold"):
            ET.SubElement(props, "property", name=key, value=repr(getattr(self, key)))
        ET.SubElement(props, "property", name="ratio", value=repr(self.ratio))
        case = ET.SubElement(
            suite,
            "testcase",
            classname="diag.sharpness",
            name=f"sharpness of {self.checkpoint} vs baseline {self.baseline_checkpoint}",
            time=f"{self.seconds:.3f}",
        )
        if not self.passed:
            failure = ET.SubElement(case, "failure", message=self.headline(), type="SharpnessRegression")
            failure.text = self.summary()
        out = ET.SubElement(case, "system-out")
        out.text = self.summary()
        ET.indent(suite)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"

    def github_annotations(self) -> str:
        """GitHub Actions workflow commands: ``::error`` on failure, ``::notice`` on a pass."""

        def esc(text: str) -> str:
            return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

        def esc_prop(text: str) -> str:
            return esc(text).replace(":", "%3A").replace(",", "%2C")

        kind = "notice" if self.passed else "error"
        title = esc_prop("Sharpness gate " + ("passed" if self.passed else "failed"))
        return f"::{kind} title={title}::{esc(self.headline())}\n"

    def step_summary_markdown(self) -> str:
        """Markdown for ``$GITHUB_STEP_SUMMARY``."""
        rows = "\n".join(
            f"| {i} | {s} | {b:.6g} | {c:.6g} | {d:+.4f} |"
            for i, (s, b, c, d) in enumerate(zip(self.seeds, self.baseline, self.candidate, self.log_ratios))
        )
        return (
            f"### {'✅' if self.passed else '❌'} {self.headline()}\n\n"
            f"| replicate | seed | baseline | candidate | log-ratio |\n|---|---|---|---|---|\n{rows}\n"
        )


def t_quantile(confidence: float, dof: int) -> float:
    """One-sided Student-t quantile ``t_{confidence, dof}``."""
    from scipy.stats import t

    return float(t.ppf(confidence, dof))


def decide(
    baseline: Sequence[float],
    candidate: Sequence[float],
    tolerance: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The paired one-sided test on ``d_i = log(candidate_i / baseline_i)``.

    Returns ``passed``, ``mean``, ``sd``, ``t``, ``lower``, ``upper``, ``threshold``, ``log_ratios``.
    """
    if len(baseline) != len(candidate) or len(baseline) < 2:
        raise DiagnosticsError("the paired test needs the same number (>= 2) of baseline and candidate replicates")
    if tolerance < 0 or not math.isfinite(tolerance):
        raise DiagnosticsError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if not 0.5 <= confidence < 1:
        raise DiagnosticsError(f"--confidence must be in [0.5, 1), got {confidence}")
    for whose, values, fix in (
        ("baseline", baseline, "the baseline is not usable: recreate it with 'diag baseline' on a trained checkpoint"),
        ("candidate", candidate, "the candidate model is not near a minimum (lambda_max <= 0)"),
    ):
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            raise DiagnosticsError(
                f"sharpness must be positive and finite for a log-ratio, got {bad[0]:.6g} in the {whose}; {fix}"
            )
    d = [math.log(c / b) for b, c in zip(baseline, candidate)]
    k = len(d)
    mean, sd = _mean_sd(d)
    t = t_quantile(confidence, k - 1)
    half = t * sd / math.sqrt(k)
    lower, upper = mean - half, mean + half
    threshold = math.log1p(tolerance)
    return {
        "passed": not lower > threshold,
        "mean": mean,
        "sd": sd,
        "t": t,
        "lower": lower,
        "upper": upper,
        "threshold": threshold,
        "log_ratios": d,
    }


# the data options diag check takes from the baseline: {name: (flag, what None means in the baseline)}
CHECK_REUSES = {
    "samples": ("--samples", "all the data"),
    "seed": ("--seed", None),
    "batch_size": ("--batch-size", "the data's own batches"),
    "dtype": ("--dtype", None),
}


def _effective_samples(samples: Any, available: Any) -> Any:
    """What a replicate measures: all the data (None) when ``samples`` is None or at least the data's size."""
    if samples is None or (isinstance(available, int) and isinstance(samples, int) and samples >= available):
        return None
    return samples


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def refuse_changed_settings(doc: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Refuse flags of ``diag check`` that ask for another measurement than the baseline's.

    ``diag check`` re-measures with the seeds, samples, batch size and dtype stored in the baseline (the pairing
    needs them). A flag among :data:`CHECK_REUSES` that is given (not None) and equal to the baseline's value is
    accepted silently (``--samples`` counts as equal when both select all the data); different values are an
    error (naming every one) instead of being ignored. A dtype the baseline does not record is the flag's to choose.

    Args:
        doc: a validated baseline document.
        given: the flags as given on the command line (None: not given).

    Raises:
        DiagnosticsError: naming the flags, the baseline's values and the fix.
    """
    recorded = doc["settings"]
    available = (doc.get("data") or {}).get("samples_available")
    flags, bases = [], []
    for name, (flag, none_means) in CHECK_REUSES.items():
        value = given.get(name)
        if value is None or (name == "dtype" and not recorded.get(name)):
            continue
        base = recorded.get(name)
        if name == "samples":
            same = _effective_samples(value, available) == _effective_samples(base, available)
        else:
            same = value == base
        if not same:
            flags.append(f"{flag} {value}")
            bases.append(f"{name}={base}" + (f" ({none_means})" if base is None and none_means else ""))
    if not flags:
        return
    verb, drop = ("differs", f"drop {flags[0].split()[0]}") if len(flags) == 1 else ("differ", "drop them")
    raise DiagnosticsError(
        f"{_and(flags)} {verb} from the baseline's {_and(bases)}, but diag check re-measures with the baseline's "
        f"settings; {drop}, or make a new baseline with 'diag baseline ... {' '.join(flags)}'"
    )


def check_comparable(ctx: Context, doc: Mapping[str, Any], settings: GateSettings) -> None:
    """Refuse a candidate that the paired check cannot compare with the baseline ``doc``.

    Checked before any Lanczos run: the dtype, the analysed parameters' names and shapes, the loss, the
    dataset size and every replicate's data subset (its hash).

    Args:
        ctx: the candidate's context.
        doc: a validated baseline document.
        settings: its settings.

    Raises:
        DiagnosticsError: naming what differs and the flag or step that fixes it.
    """
    base_settings = doc["settings"]
    dtype = str(ctx.dtype).replace("torch.", "")
    if base_settings.get("dtype") and base_settings["dtype"] != dtype:
        raise DiagnosticsError(
            f"the baseline was measured in {base_settings['dtype']} but the check runs in {dtype}; "
            f"pass --dtype {base_settings['dtype']}"
        )
    _check_layout(parameter_layout(ctx), doc["parameters"])
    data = doc["data"]
    if data.get("loss") not in (None, ctx.loss_name):
        raise DiagnosticsError(
            f"the baseline was measured with loss '{data.get('loss')}' but the check uses '{ctx.loss_name}'; "
            f"pass --loss {data.get('loss')}"
        )
    if data.get("samples_available") not in (None, ctx.n_samples):
        raise DiagnosticsError(
            f"the data has {ctx.n_samples} samples but the baseline's had {data.get('samples_available')}; "
            "the paired check needs the same dataset: recreate the baseline"
        )
    for i, (seed, old) in enumerate(zip(settings.seeds, doc["replicates"])):
        if subset_sha256(replicate_batches(ctx, seed, settings)) != old["subset_sha256"]:
            raise DiagnosticsError(
                f"replicate {i} (seed {seed}) sees a different data subset than the baseline's "
                "(the data or its order changed); the paired check needs the same data: recreate the baseline"
            )


def _check_layout(layout: Mapping[str, Any], base_layout: Mapping[str, Any]) -> None:
    """The candidate's analysed parameters must have the baseline's names and shapes (hash)."""
    if base_layout.get("sha256") == layout["sha256"]:
        return
    same_counts = (base_layout.get("n_params"), base_layout.get("n_tensors")) == (
        layout["n_params"],
        layout["n_tensors"],
    )
    how = (
        f"have the same size ({layout['n_params']} in {layout['n_tensors']} tensors) but other names or shapes "
        "than the baseline's"
        if same_counts
        else f"({layout['n_params']} in {layout['n_tensors']} tensors) differ from the baseline's "
        f"({base_layout.get('n_params')} in {base_layout.get('n_tensors')})"
    )
    raise DiagnosticsError(
        f"the candidate's analysed parameters {how}; sharpness is only compared between models of the same "
        "architecture: recreate the baseline"
    )


def check_against_baseline(
    ctx: Context,
    baseline: Mapping[str, Any],
    *,
    tolerance: float = 0.10,
    confidence: float = 0.95,
    progress: ProgressFn | None = None,
) -> GateReport:
    """Measure the candidate in ``ctx`` with the baseline's seeds and settings; decide (paired).

    Raises:
        DiagnosticsError: the candidate cannot be compared with the baseline (other dtype, parameter
            layout, loss, dataset or data subsets).
    """
    t0 = time.perf_counter()
    doc = validate_baseline(dict(baseline))
    settings = baseline_settings(doc)
    base_settings = doc["settings"]
    check_comparable(ctx, doc, settings)
    reps = measure_sharpness(ctx, settings, progress)
    base_values = [float(r["sharpness"]) for r in doc["replicates"]]
    new_values = [r.sharpness for r in reps]
    res = decide(base_values, new_values, tolerance, confidence)
    notes = []
    if not all(r.converged for r in reps):
        fix = unconverged_fix(max(r.floor_tol for r in reps), ctx.dtype)
        notes.append(f"Lanczos did not reach tol={settings.tol} in every candidate replicate: {fix}")
    return GateReport(
        passed=res["passed"],
        tolerance=float(tolerance),
        confidence=float(confidence),
        replicates=len(reps),
        mean_log_ratio=res["mean"],
        sd_log_ratio=res["sd"],
        t_quantile=res["t"],
        lower_bound=res["lower"],
        upper_bound=res["upper"],
        threshold=res["threshold"],
        baseline_mean=sum(base_values) / len(base_values),
        candidate_mean=sum(new_values) / len(new_values),
        log_ratios=res["log_ratios"],
        baseline=base_values,
        candidate=new_values,
        seeds=[r.seed for r in reps],
        checkpoint=ctx.checkpoint,
        baseline_checkpoint=str((doc.get("checkpoint") or {}).get("name", "baseline")),
        settings={**base_settings},
        notes=notes,
        seconds=time.perf_counter() - t0,
    )


def running_in_github_actions(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``GITHUB_ACTIONS`` is ``"true"`` in ``env`` (default: ``os.environ``)."""
    return (env if env is not None else os.environ).get("GITHUB_ACTIONS") == "true"
