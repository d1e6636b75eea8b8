"""Reports: tables, figures that appear only with their records, self-contained HTML in a real browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diagnostics.examples.digits import train_gd
from diagnostics.report import (
    SweepManifest,
    build_report,
    declarations,
    key_columns,
    metric_overview,
    pretty_rule,
    report_from_sweep,
    run_data,
    section_figures,
    summary_table,
    threshold_label,
)
from diagnostics.results import COLUMNS, atomic_write_bytes, make_records, records_to_frame
from diagnostics.runner import RunInfo
from diagnostics.runs import SweepSettings, sweep
from diagnostics.spec import Analyzer, Metric, Section, Threshold

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


TOY = Analyzer(
    name="toy",
    summary="a user analyzer passed to the report as specs",
    config=object,
    run=lambda config, ctx, progress=None: None,
    metrics=(Metric("gain", "the toy's gain, g = 2^k", headline=True, group="the layer"),),
    sections=(Section("Toy gain", ("gain",), "The gain doubles every checkpoint.", log_y=True),),
)


def synthetic_run(steps=(0, 100, 200, 300), with_all: bool = True) -> tuple[pd.DataFrame, dict]:
    """Records of a 4-checkpoint run: Hessian, RankMe, a 1-d landscape, a user analyzer (declared through
    ``specs``) with an undeclared metric, plus the artifacts (density, landscape grid)."""
    records = []
    dens, grids = [], []
    rng = np.random.default_rng(0)
    xs = np.linspace(-1, 1, 9)
    for k, step in enumerate(steps):
        name = f"step_{step:05d}.pt"
        lam = 0.5 + 0.15 * k
        records += make_records(
            name,
            step,
            "hessian",
            [
                ("eigenvalue", lam, 1e-4, 0),
                ("eigenvalue", lam * 0.7, 1e-4, 1),
                ("eos_threshold", 1.0),
                ("eos_ratio", lam),
                ("trace", 10.0 + k, 0.2),
                ("bottom_eigenvalue", -0.1 / (k + 1), 1e-4, 0),
            ],
        )
        if with_all:
            records += make_records(name, step, "rankme", [("rankme", 20.0 - k, None, None, "features")])
            loss = 0.1 + (xs * (1 + k)) ** 2
            records += make_records(name, step, "landscape", [("loss", v, None, i) for i, v in enumerate(loss)])
            grids.append(pd.DataFrame({"checkpoint": name, "step": step, "x": xs, "loss": loss, "accuracy": 0.5}))
            records += make_records(
                name,
                step,
                "toy",
                [
                    ("gain", 2.0**k, None, None, "fc1"),
                    ("wobble", float(k % 2), None, None, "fc1"),  # undeclared: a generic panel
                    ("gain", 3.0, None, None, "fc1/class=0"),  # a sub-group: never a series
                ],
            )
        grid = np.linspace(-0.2, lam + 0.1, 50)
        dens.append(
            pd.DataFrame(
                {"checkpoint": name, "step": step, "group": "", "eigenvalue": grid, "density": rng.random(50) + 0.01}
            )
        )
    artifacts = {"hessian": {"density": pd.concat(dens, ignore_index=True)}}
    if grids:
        artifacts["landscape"] = {"grid": pd.concat(grids, ignore_index=True)}
    return records_to_frame(records), artifacts


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def decode_png(src: str) -> bytes:
    assert src.startswith("data:image/png;base64,"), src[:40]
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert data.startswith(PNG_MAGIC)
    return data


def threshold_section(analyzer: str = "hessian") -> Section:
    """The section that draws the edge-of-stability threshold (declared by the analyzer, or transitional)."""
    return next(s for s in declarations()[analyzer].sections if s.thresholds)


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


SHARP = "sharpness-and-the-edge-of-stability"


# --------------------------------------------------------------------------------------- tables
def test_summary_tables_hold_the_records() -> None:
    frame, _ = synthetic_run()
    decl = declarations({"toy": TOY})
    table = summary_table(frame, decl)
    assert table["checkpoint"].tolist() == [f"step_{s:05d}.pt" for s in (0, 100, 200, 300)]
    assert table["step"].tolist() == [0, 100, 200, 300]
    assert np.allclose(table["eigenvalue_0"], [0.5, 0.65, 0.8, 0.95])
    assert np.allclose(table["rankme@features"], [20, 19, 18, 17])
    assert "eigenvalue_1" not in table
    # a landscape grid point is not a per-checkpoint number (loss is declared per point, not headline)
    assert not any(c.startswith(("loss", "accuracy")) for c in table.columns)
    assert not any("class=" in c for c in table.columns)
    over = metric_overview(frame, decl).set_index("metric")
    assert over.loc["eigenvalue_0", "first"] == 0.5 and over.loc["eigenvalue_0", "max at"] == "step 300"
    assert over.loc["gain@fc1", "min at"] == "step 0"
    # every metric comes with its declared definition (none for an undeclared one)
    assert "Lanczos" in over.loc["eigenvalue_0", "definition"]
    assert over.loc["rankme@features", "definition"].startswith("exp(-sum_k p_k log p_k)")
    assert "Garrido et al. 2023" in over.loc["rankme@features", "definition"]
    assert (
        over.loc["gain@fc1", "definition"] == "the toy's gain, g = 2^k" and over.loc["wobble@fc1", "definition"] == ""
    )
    # the key table: the metrics declared headline (index 0 of an indexed one), registry order, then the user's
    keys = key_columns(table, decl).columns.tolist()
    headline = {m.name for d in decl.values() for m in d.metrics if m.headline}
    expected = {c for c in table.columns[2:] if re.sub(r"_0$", "", c.split("@")[0]) in headline}
    assert keys[:3] == ["checkpoint", "step", "eigenvalue_0"] and set(keys[2:]) == expected
    assert keys[-1] == "gain@fc1" and "rankme@features" in keys and "wobble@fc1" not in keys
    assert "eigenvalue_1" not in keys


def test_manifest_reads_typed() -> None:
    meta = {
        "run": "/runs/x",
        "settings": {"seed": 3, "samples": 50, "unknown_key": 1},
        "checkpoints": [{"checkpoint": "a.pt", "step": 5, "status": {"hessian": "computed"}}],
        "results": {"a.pt": {"hessian": {"samples": 50, "hvp_count": 7, "replicates": 2}}},
        "failures": [{"checkpoint": "b.pt", "analyzer": "hessian", "message": "NaN weights"}],
    }
    m = SweepManifest.from_metadata(meta)
    assert m.settings.seed == 3 and m.settings.samples == 50 and m.run_name == "run"
    assert m.checkpoints[0].step == 5 and m.failures[0].message == "NaN weights"
    info = m.run_infos()[("a.pt", "hessian")]
    assert isinstance(info, RunInfo) and info.hvp_count == 7 and info.replicates == 2
    assert SweepManifest.from_metadata(None).checkpoints == []


# -------------------------------------------------------------------------------------- figures
def test_report_has_every_section_with_embedded_pngs() -> None:
    frame, artifacts = synthetic_run()
    meta = {
        "run": "/runs/digits",
        "run_name": "digits",
        "settings": {"seed": 7, "samples": 300},
        "results": {"step_00000.pt": {"hessian": {"samples": 300, "samples_available": 1437, "hvp_count": 12}}},
        "versions": {"torch": "2.x"},
        "checkpoints": [{"checkpoint": f"step_{s:05d}.pt", "step": s, "sha256": "ab" * 32} for s in (0, 100, 200, 300)],
    }
    report = build_report(frame, meta, artifacts=artifacts, specs={"toy": TOY})
    keys = [f.key for f in report.figures]
    # registry order (hessian, landscape, rankme), then the user's analyzer and its undeclared metric
    assert keys == [
        SHARP,
        "hessian-trace",
        "bottom-hessian-eigenvalues",
        "density",
        "landscape",
        "representation-rank",
        "toy-gain",
        "analyzer-toy",
    ]
    sources = img_sources(report.html)
    assert len(sources) == len(keys)
    for src, fig in zip(sources, report.figures):
        assert decode_png(src) == fig.png
    files = report.files()
    for key in keys:
        assert f"(figures/{key}.png)" in report.markdown
        assert files[f"figures/{key}.png"].startswith(PNG_MAGIC)
    # self-contained: nothing fetched from anywhere
    assert not re.search(r'(src|href)="(?!data:|#)', report.html)
    assert "<script" not in report.html
    for text in ("seed", "7", "1437", "torch 2.x", "Training diagnostics: digits", "Bands: ±1 standard error"):
        assert text in report.html and text in report.markdown
    # the declared text of a section is its caption; no threshold rule recorded: the metric's name stands in
    sharp = report.figures[0]
    assert sharp.caption.startswith("Top Hessian eigenvalues") and "Dashed: eos_threshold = 1." in sharp.caption


def test_report_degrades_to_what_exists() -> None:
    frame, _ = synthetic_run(with_all=False)
    only_top = frame[frame["metric"] == "eigenvalue"]
    report = build_report(only_top, {})
    assert [f.key for f in report.figures] == [SHARP]
    assert "Dashed" not in report.figures[0].caption  # no threshold records, no line
    for absent in ("Representation rank", "Loss-landscape", "spectral density", "Hessian trace"):
        assert absent not in report.html
    full = build_report(frame, {})
    assert [f.key for f in full.figures] == [SHARP, "hessian-trace", "bottom-hessian-eigenvalues"]


def test_report_without_steps_uses_checkpoint_order() -> None:
    frame, artifacts = synthetic_run()
    frame["step"] = pd.array([None] * len(frame), dtype="Int64")
    artifacts["hessian"]["density"]["step"] = None
    artifacts["landscape"]["grid"]["step"] = None
    report = build_report(frame, {}, artifacts=artifacts)
    keys = [f.key for f in report.figures]
    assert {SHARP, "density", "landscape"} <= set(keys)
    assert "steps unknown" in report.html


def test_unknown_analyzer_gets_its_own_figure() -> None:
    frame, _ = synthetic_run(with_all=False)
    extra = records_to_frame(
        [
            r
            for s in (0, 100)
            for r in make_records(
                f"step_{s:05d}.pt",
                s,
                "mine",
                [("spectral_norm", 1 + s / 100, None, None, "fc1"), ("spectral_norm", 2.0, None, None, "fc2")],
            )
        ]
    )
    report = build_report(pd.concat([frame, extra], ignore_index=True), {})
    assert report.figures[-1].key == "analyzer-mine" and report.figures[-1].title == "mine"
    with pytest.raises(ValueError, match="lacks the columns"):
        build_report(frame.drop(columns=["stderr"]), {})
    assert list(frame.columns) == COLUMNS


# ----------------------------------------------------------------------------------- thresholds
def eos_runs(frame: pd.DataFrame, rule: str | None, replicates: int = 1) -> dict:
    eos = {} if rule is None else {"rule": rule, "kind": "x", "threshold": 1.0}
    return {
        (ck, "hessian"): RunInfo(analyzer="hessian", checkpoint=ck, replicates=replicates, details={"eos": eos})
        for ck in dict.fromkeys(frame["checkpoint"])
    }


def test_threshold_line_is_labelled_with_its_rule_and_value() -> None:
    frame, _ = synthetic_run(with_all=False)
    frame.loc[frame["metric"] == "eos_threshold", "value"] = 7.6
    data = run_data(frame, {}, runs=eos_runs(frame, "(2+2*beta)/lr"))
    (made,) = section_figures(data, "hessian", threshold_section())
    assert "(2+2β)/η = 7.6" in legend_texts(made.figure)
    assert "Dashed: (2+2β)/η = 7.6." in made.caption
    # a threshold that moves (a learning-rate schedule): the range it draws
    frame.loc[frame["metric"] == "eos_threshold", "value"] = [4.0, 4.0, 5.0, 8.0]
    (moving,) = section_figures(run_data(frame, {}, runs=eos_runs(frame, "2/lr")), "hessian", threshold_section())
    assert "2/η = 4–8" in legend_texts(moving.figure)
    assert threshold_label(Threshold("t", "{rule} = {value} {other}"), [2.0], []) == "t = 2 {other}"
    assert pretty_rule("(2+2*beta1)/((1-beta1)*lr)") == "(2+2β₁)/((1-β₁)η)"


def test_replicate_bands_say_what_they_are() -> None:
    frame, _ = synthetic_run(with_all=False)
    report = build_report(frame, {}, runs=eos_runs(frame, "2/lr", replicates=4))
    trace = next(f for f in report.figures if f.key == "hessian-trace")
    assert "±1 standard error across 4 disjoint data subsets (--replicates 4)" in trace.caption
    assert "4 disjoint data subsets" in report.html  # and in the run metadata


def test_a_momentum_checkpoint_is_labelled_with_the_momentum_threshold(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_gd(run, lr=0.5, steps=4, save_every=2, momentum=0.9, width=8)
    res = sweep(run, SweepSettings(analyzers=["hessian"], options={"hessian": {"top_k": 1}}, samples=64))
    thr = res.frame[res.frame["metric"] == "eos_threshold"]["value"]
    assert np.allclose(thr, (2 + 2 * 0.9) / 0.5)  # heavy-ball: (2+2 beta)/eta
    report = report_from_sweep(res)
    sharp = next(f for f in report.figures if f.key == SHARP)
    assert "Dashed: (2+2β)/η = 7.6." in sharp.caption and "Dashed: 2/η" not in sharp.caption
    runs = {key: RunInfo.from_metadata(r.metadata) for key, r in res.results.items()}
    (made,) = section_figures(run_data(res.frame, res.metadata(), runs=runs), "hessian", threshold_section())
    labels = legend_texts(made.figure)
    assert "(2+2β)/η = 7.6" in labels and not any(t.startswith("2/η") for t in labels)
    # plain gradient descent: 2/eta
    gd = tmp_path / "gd"
    train_gd(gd, lr=0.5, steps=2, save_every=2, width=8)
    plain = report_from_sweep(sweep(gd, SweepSettings(analyzers=["hessian"], samples=64)))
    assert "Dashed: 2/η = 4." in next(f for f in plain.figures if f.key == SHARP).caption


# ------------------------------------------------------------------------------------- landscape
def test_a_swept_landscape_is_drawn_from_its_grid_also_from_the_cache(digits_run: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for p in digits_run:
        shutil.copy2(p, run / p.name)
    settings = SweepSettings(analyzers=["landscape"], options={"landscape": {"dims": 1, "steps": 5}}, samples=100)
    first = sweep(run, settings, cache_dir=tmp_path / "cache")
    assert first.frame["group"].isna().all()  # no coordinates packed into group
    again = sweep(run, settings, cache_dir=tmp_path / "cache")
    assert len(again.cached) == len(digits_run)
    for res in (first, again):
        grid = res.artifact_frame("landscape", "grid")
        assert list(grid.columns[:3]) == ["checkpoint", "step", "x"] and len(grid) == 5 * len(digits_run)
        report = report_from_sweep(res)
        assert [f.key for f in report.figures] == ["landscape"]
        assert "loss_0" not in report.markdown  # grid points are not per-checkpoint metrics


# ----------------------------------------------------------------------- a real headless browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser(binary: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


_IMAGE_PROBE = """<script>window.addEventListener("load", () => {
  const ok = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  document.body.setAttribute("data-images", JSON.stringify(ok));
});</script></body>"""


def _audit_page(binary: str, page: Path, work: Path) -> tuple[list[bool], list[str]]:
    """Load ``page`` in the browser: (loaded flag of each <img>, console messages)."""
    probe = work / f"probe-{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", _IMAGE_PROBE, 1))
    dom = _browser(binary, probe.as_uri(), work / "profile-dom", "--virtual-time-budget=5000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-images="([^"]*)"', dom.stdout)
    assert m, "the page never fired its load event"
    loaded = json.loads(m.group(1).replace("&quot;", '"'))
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    return loaded, console


def test_report_renders_in_a_headless_browser(digits_run: list[Path], tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, but CI=true requires the browser test (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); the browser test runs in CI")
    run = tmp_path / "run"
    run.mkdir()
    for p in digits_run:
        shutil.copy2(p, run / p.name)
    options = {"top_k": 2, "bottom_k": 1, "trace": True, "trace_samples": 20, "trace_rtol": 0.05}
    options.update(density=True, density_probes=2, density_steps=20, density_points=128)
    res = sweep(run, SweepSettings(options={"hessian": options}, samples=300), cache_dir=tmp_path / "cache")
    report = report_from_sweep(res)
    out = tmp_path / "report"
    for rel, data in report.files().items():
        atomic_write_bytes(out / rel, data)
    index = out / "index.html"
    page = index.read_text()
    sources = img_sources(page)
    assert len(sources) == len(report.figures) >= 5
    for src in sources:
        decode_png(src)

    # negative control: the harness must notice a broken image and a console error
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA"><img src="nowhere.png">'
        '<script>console.error("broken")</script></body></html>'
    )
    loaded, console = _audit_page(binary, bad, tmp_path)
    assert loaded == [False, False] and any("broken" in line for line in console)

    loaded, console = _audit_page(binary, index, tmp_path)
    assert loaded == [True] * len(sources), f"images that did not load: {loaded}"
    assert console == [], f"console messages: {console}"

    artifacts = Path(os.environ.get("DIAG_TEST_ARTIFACTS", REPO / "reports" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report-screenshot.png"
    done = _browser(
        binary, index.as_uri(), tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if ":CONSOLE" in line] == []
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert float(pixels[..., :3].std()) > 0.05, "the screenshot is blank"
    print(f"\nreport screenshot: {shot}")


def test_checkpoints_that_share_a_step_are_plotted_in_order_with_a_note() -> None:
    from diagnostics.plots import _with_x, steps_usable
    from diagnostics.report import shared_step_notes

    frame = pd.DataFrame(
        {
            "checkpoint": ["seed0/step_1.pt", "seed0/step_2.pt", "seed1/step_1.pt"],
            "step": pd.array([1, 2, 1], dtype="Int64"),
            "metric": "eigenvalue",
            "value": [1.0, 2.0, 3.0],
        }
    )
    assert not steps_usable(frame)
    df, label = _with_x(frame, list(frame["checkpoint"]))
    assert label == "checkpoint (in order)" and df["_x"].tolist() == [0.0, 1.0, 2.0]
    [note] = shared_step_notes(frame)
    assert "seed0/step_1.pt, seed1/step_1.pt at step 1" in note and "in order" in note
    unique = frame.assign(step=pd.array([1, 2, 3], dtype="Int64"))
    assert steps_usable(unique) and shared_step_notes(unique) == []
    assert _with_x(unique)[1] == "training step"
    repeated = pd.concat([unique, unique.assign(metric="trace")])  # many records per checkpoint: one step each
    assert steps_usable(repeated) and shared_step_notes(repeated) == []


def test_user_text_is_escaped_in_the_markdown_too() -> None:
    frame, _ = synthetic_run(with_all=False)
    meta = {"notes": ["loss < 1 & <b>bold</b>"]}
    report = build_report(frame[frame["metric"] == "eigenvalue"], meta, title="<script>alert(1)</script>")
    assert "<script>" not in report.markdown and "# &lt;script&gt;alert(1)&lt;/script&gt;" in report.markdown
    assert "- loss &lt; 1 &amp; &lt;b&gt;bold&lt;/b&gt;" in report.markdown
    assert "<script>" not in report.html
