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

from diagnostics.report import build_report, key_columns, metric_overview, summary_table
from diagnostics.results import COLUMNS, atomic_write_bytes, make_records, records_to_frame
from diagnostics.runs import SweepSettings, sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def synthetic_run(steps=(0, 100, 200, 300), with_all: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Records of a 4-checkpoint run: Hessian, RankMe, NC metrics, a 1-d landscape, plus a density."""
    records = []
    dens = []
    rng = np.random.default_rng(0)
    for k, step in enumerate(steps):
        name = f"step_{step:05d}.pt"
        lam = 0.5 + 0.15 * k
        rows = [
            ("eigenvalue", lam, 1e-4, 0),
            ("eigenvalue", lam * 0.7, 1e-4, 1),
            ("eos_threshold", 1.0),
            ("eos_ratio", lam),
            ("trace", 10.0 + k, 0.2),
            ("bottom_eigenvalue", -0.1 / (k + 1), 1e-4, 0),
        ]
        if with_all:
            rows += [
                ("rankme", 20.0 - k, None, None, "features"),
                ("nc1", 10.0 / (k + 1), None, None, "features"),
                ("nc2_equinorm", 0.3 - 0.05 * k, None, None, "features"),
                ("nc2_equiangular", 0.2 - 0.03 * k, None, None, "features"),
                ("nc3", 1.0 - 0.2 * k, None, None, "features"),
                ("nc4", 0.5 - 0.1 * k, None, None, "features"),
                ("nc1", 3.0, None, None, "features/class=0"),  # per-class: never a series
            ]
            rows += [
                ("loss", 0.1 + (x * (1 + k)) ** 2, None, i, f"x={x:g}") for i, x in enumerate(np.linspace(-1, 1, 9))
            ]
        records += make_records(
            name,
            step,
            "hessian",
            [r for r in rows if r[0] in ("eigenvalue", "eos_threshold", "eos_ratio", "trace", "bottom_eigenvalue")],
        )
        records += make_records(name, step, "rankme", [r for r in rows if r[0] == "rankme"])
        records += make_records(name, step, "collapse", [r for r in rows if r[0].startswith("nc")])
        records += make_records(name, step, "landscape", [r for r in rows if r[0] == "loss"])
        grid = np.linspace(-0.2, lam + 0.1, 50)
        dens.append(
            pd.DataFrame(
                {"checkpoint": name, "step": step, "group": "", "eigenvalue": grid, "density": rng.random(50) + 0.01}
            )
        )
    return records_to_frame(records), pd.concat(dens, ignore_index=True)


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def decode_png(src: str) -> bytes:
    assert src.startswith("data:image/png;base64,"), src[:40]
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert data.startswith(PNG_MAGIC)
    return data


# --------------------------------------------------------------------------------------- tables
def test_summary_tables_hold_the_records() -> None:
    frame, _ = synthetic_run()
    table = summary_table(frame)
    assert table["checkpoint"].tolist() == [f"step_{s:05d}.pt" for s in (0, 100, 200, 300)]
    assert table["step"].tolist() == [0, 100, 200, 300]
    assert np.allclose(table["eigenvalue_0"], [0.5, 0.65, 0.8, 0.95])
    assert np.allclose(table["rankme@features"], [20, 19, 18, 17])
    assert "eigenvalue_1" not in table and not any(c.startswith("loss") for c in table.columns)
    assert not any("class=" in c for c in table.columns)
    over = metric_overview(frame).set_index("metric")
    assert over.loc["eigenvalue_0", "first"] == 0.5 and over.loc["eigenvalue_0", "max at"] == "step 300"
    assert over.loc["nc1@features", "min at"] == "step 300"
    assert key_columns(table).columns[:4].tolist() == ["checkpoint", "step", "eigenvalue_0", "eos_ratio"]


# -------------------------------------------------------------------------------------- figures
def test_report_has_every_section_with_embedded_pngs() -> None:
    frame, density = synthetic_run()
    meta = {
        "run": "/runs/digits",
        "run_name": "digits",
        "settings": {"seed": 7, "samples": 300},
        "results": {"step_00000.pt": {"hessian": {"samples": 300, "samples_available": 1437, "hvp_count": 12}}},
        "versions": {"torch": "2.x"},
        "checkpoints": [{"checkpoint": f"step_{s:05d}.pt", "step": s, "sha256": "ab" * 32} for s in (0, 100, 200, 300)],
    }
    report = build_report(frame, meta, density=density)
    keys = [f.key for f in report.figures]
    assert keys == ["sharpness", "trace", "bottom_eigenvalue", "density", "rank", "collapse", "landscape"]
    sources = img_sources(report.html)
    assert len(sources) == len(keys)
    for src, fig in zip(sources, report.figures):
        assert decode_png(src) == fig.png
    files = report.files()
    for key in keys:
        assert "![" in report.markdown and f"(figures/{key}.png)" in report.markdown
        assert files[f"figures/{key}.png"].startswith(PNG_MAGIC)
    # self-contained: nothing fetched from anywhere
    assert not re.search(r'(src|href)="(?!data:|#)', report.html)
    assert "<script" not in report.html
    for text in ("seed", "7", "1437", "torch 2.x", "Training diagnostics: digits"):
        assert text in report.html and text in report.markdown


def test_report_degrades_to_what_exists() -> None:
    frame, _ = synthetic_run(with_all=False)
    only_top = frame[frame["metric"] == "eigenvalue"]
    report = build_report(only_top, {})
    assert [f.key for f in report.figures] == ["sharpness"]
    for absent in ("Neural collapse", "Representation rank", "Loss-landscape", "spectral density"):
        assert absent not in report.html
    full = build_report(frame, {})
    assert [f.key for f in full.figures] == ["sharpness", "trace", "bottom_eigenvalue"]


def test_report_without_steps_uses_checkpoint_order() -> None:
    frame, density = synthetic_run()
    frame["step"] = pd.array([None] * len(frame), dtype="Int64")
    density["step"] = None
    report = build_report(frame, {}, density=density)
    assert "sharpness" in [f.key for f in report.figures] and "density" in [f.key for f in report.figures]
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
                "weights",
                [("spectral_norm", 1 + s / 100, None, None, "fc1"), ("spectral_norm", 2.0, None, None, "fc2")],
            )
        ]
    )
    report = build_report(pd.concat([frame, extra], ignore_index=True), {})
    assert "analyzer-weights" in [f.key for f in report.figures]
    with pytest.raises(ValueError, match="lacks the columns"):
        build_report(frame.drop(columns=["stderr"]), {})
    assert list(frame.columns) == COLUMNS


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
    from diagnostics.report import report_from_sweep

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
