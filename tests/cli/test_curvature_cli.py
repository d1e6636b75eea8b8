"""``diag hessian --curvature ... / --gradient-alignment`` through Typer's CliRunner, diag.toml and ``--set`` in a
sweep, and the report sections the new metrics get."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tinymodels as tm
from cliutils import one_line_error
from curvature_refs import dense_ggn, dense_gradient, dense_loss_hessian, eig_desc
from diag_cli.main import app
from diagnostics.binding import Binding
from diagnostics.checkpoint import load_checkpoint, save_checkpoint
from diagnostics.context import build_context
from diagnostics.report import report_from_sweep
from diagnostics.runs import SweepSettings, sweep

runner = CliRunner()
TINY = ["--model", "tinymodels:build_tiny", "--data", "tinymodels:tiny_data", "--dtype", "float64"]


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "tiny.pt", tm.build_tiny(), step=7)


def tiny_context(path: Path):
    return build_context(
        load_checkpoint(path),
        Binding(model="tinymodels:build_tiny", data="tinymodels:tiny_data", loss="cross_entropy"),
        dtype="float64",
    )


def records(result, metric):
    return sorted(
        (r for r in json.loads(result.stdout) if r["metric"] == metric),
        key=lambda r: (str(r["group"]), -1 if r["index"] is None else r["index"]),
    )


def test_ggn_top_k_emits_eigenvalue_records(tiny_ckpt: Path) -> None:
    r = run("hessian", str(tiny_ckpt), *TINY, "--curvature", "ggn", "--top-k", "3", "--tol", "1e-8", "--format", "json")
    assert r.exit_code == 0, r.output
    eig = records(r, "eigenvalue")
    assert [e["index"] for e in eig] == [0, 1, 2] and all(e["analyzer"] == "hessian" for e in eig)
    ctx = tiny_context(tiny_ckpt)
    exact = eig_desc(dense_ggn(ctx, ctx.batches))[:3]
    np.testing.assert_allclose([e["value"] for e in eig], exact, rtol=1e-7)
    hess = eig_desc(dense_loss_hessian(ctx, ctx.batches))[:3]
    assert not np.allclose(exact, hess, rtol=1e-3)  # it is not the Hessian


def test_gradient_alignment_emits_its_records(tiny_ckpt: Path) -> None:
    r = run("hessian", str(tiny_ckpt), *TINY, "--top-k", "5", "--gradient-alignment", "--format", "json")
    assert r.exit_code == 0, r.output
    assert len(records(r, "eigenvalue")) == 5
    (al,) = records(r, "gradient_alignment")
    assert al["group"] is None and 0 <= al["value"] <= 1 and al["stderr"] is not None
    overlaps = records(r, "gradient_overlap")
    assert len(overlaps) == 5 and sum(o["value"] for o in overlaps) == pytest.approx(al["value"], rel=1e-9)
    ctx = tiny_context(tiny_ckpt)
    w, U = np.linalg.eigh(dense_loss_hessian(ctx, ctx.batches).numpy())
    g = dense_gradient(ctx, ctx.batches).numpy()
    Uk = U[:, np.argsort(w)[::-1][:5]]
    exact = float(((Uk.T @ g) ** 2).sum() / (g @ g))
    assert abs(al["value"] - exact) <= al["stderr"] + 1e-12


def test_curvature_from_diag_toml(tiny_ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "diag.toml").write_text(
        'model = "tinymodels:build_tiny"\ndata = "tinymodels:tiny_data"\ndtype = "float64"\n'
        '[hessian]\ncurvature = "empirical_fisher"\ntop_k = 2\ncompare_curvatures = ["hessian", "ggn"]\n'
    )
    r = run("hessian", str(tiny_ckpt), "--config", str(tmp_path / "diag.toml"), "--format", "json")
    assert r.exit_code == 0, r.output
    assert len(records(r, "eigenvalue")) == 2
    assert {c["group"] for c in records(r, "curvature_eigenvalue")} == {"curvature=hessian", "curvature=ggn"}
    # a flag wins over the table
    r2 = run(
        "hessian", str(tiny_ckpt), "--config", str(tmp_path / "diag.toml"), "--curvature", "ggn", "--format", "json"
    )
    assert r2.exit_code == 0, r2.output
    ggn = [c["value"] for c in records(r2, "curvature_eigenvalue") if c["group"] == "curvature=ggn"]
    np.testing.assert_allclose([e["value"] for e in records(r2, "eigenvalue")], ggn, rtol=1e-12)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--curvature", "gauss_newton"], "--curvature must be one of"),
        (["--compare-curvatures", "hessian,kfac"], "--compare-curvatures must be one of"),
        (["--curvature", "ggn", "--loss", "nll"], "nll is linear"),
        (["--fisher-samples", "1"], "--fisher-samples must be >= 2"),
    ],
)
def test_bad_curvature_input_is_one_line_exit_2(tiny_ckpt: Path, args, fragment) -> None:
    r = run("hessian", str(tiny_ckpt), *TINY, *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.output, r.stderr


def test_help_lists_the_new_options() -> None:
    r = runner.invoke(app, ["hessian", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert r.exit_code == 0
    for flag in ("--curvature", "--compare-curvatures", "--gradient-alignment", "--batch-sharpness", "--outliers"):
        assert flag in r.output


def test_sweep_and_report_show_the_new_sections(digits_run: list[Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for p in digits_run:
        shutil.copy2(p, run_dir / p.name)
    options = {
        "top_k": 2,
        "tol": 1e-2,
        "compare_curvatures": ["hessian", "ggn"],
        "gradient_alignment": True,
        "outliers": True,
        "outlier_k": 12,
        "batch_sharpness": True,
        "block_heterogeneity": True,
        "blocks": "layer",
        "density_probes": 2,
        "density_steps": 20,
    }
    res = sweep(run_dir, SweepSettings(analyzers=["hessian"], options={"hessian": options}, samples=120, batch_size=40))
    frame = res.frame
    for metric in (
        "curvature_eigenvalue",
        "gradient_alignment",
        "outlier_count",
        "batch_sharpness",
        "block_heterogeneity",
    ):
        assert (frame["metric"] == metric).sum() >= len(digits_run), metric
    report = report_from_sweep(res)
    keys = {f.key for f in report.figures}
    assert {"curvatures", "batch-sharpness", "gradient-alignment", "block-heterogeneity"} <= keys, keys
    assert any(k.startswith("outliers-above") for k in keys), keys
    outliers = next(f for f in report.figures if f.key.startswith("outliers-above"))
    assert "classes C = 10" in outliers.caption
    batch = next(f for f in report.figures if f.key == "batch-sharpness")
    assert batch.png[:4] == b"\x89PNG"


# ------------------------------------------------------------- dict batches, dict outputs, model losses
def test_ggn_and_fisher_on_dict_batches_and_dict_outputs(tmp_path: Path) -> None:
    import hfmodels as hm
    from curvature_refs import build_dict_tiny, dense_empirical_fisher

    path = save_checkpoint(tmp_path / "d.pt", build_dict_tiny(), step=1)
    args = ["--model", "curvature_refs:build_dict_tiny", "--data", "hfmodels:image_dicts", "--dtype", "float64"]
    ref_ctx = tiny_context(save_checkpoint(tmp_path / "t.pt", tm.build_tiny(), step=1))  # same weights (seed 0)
    batches = [(d["image"].double(), d["label"]) for d in hm.image_dicts()]
    exact = {
        "ggn": eig_desc(dense_ggn(ref_ctx, batches))[:2],
        "empirical_fisher": eig_desc(dense_empirical_fisher(ref_ctx, batches))[:2],
    }
    exact["fisher"] = exact["ggn"]  # cross-entropy: F = GGN
    for kind, want in exact.items():
        r = run("hessian", str(path), *args, "--curvature", kind, "--top-k", "2", "--tol", "1e-9", "--format", "json")
        assert r.exit_code == 0, r.output
        got = [e["value"] for e in records(r, "eigenvalue")]
        np.testing.assert_allclose(got, want, rtol=1e-7, err_msg=kind)


@pytest.mark.parametrize("kind", ["ggn", "fisher", "functional"])
def test_model_losses_and_token_targets_are_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("transformers")
    import hfmodels as hm

    hm.build_gpt().save_pretrained(tmp_path / "gpt")
    gpt = str(tmp_path / "gpt")
    # the model computes its own loss (--loss model, a dict batch with labels): no l(z, y) to split
    one_line_error(
        run("hessian", gpt, "--data", "hfmodels:gpt_batches", "--curvature", kind),
        f"--curvature {kind}",
        "--loss model",
    )
    # token-level targets with a named loss: refused, naming what works
    one_line_error(
        run("hessian", gpt, "--data", "hfmodels:gpt_token_targets", "--loss", "cross_entropy", "--curvature", kind),
        "token-level",
        "empirical_fisher",
    )
    if kind != "ggn":
        return
    # the same data and --curvature empirical_fisher works (per-sample gradients of the token-weighted loss)
    r = run("hessian", gpt, "--data", "hfmodels:gpt_batches", "--curvature", "empirical_fisher", "--format", "json")
    assert r.exit_code == 0, r.output
    assert records(r, "eigenvalue")[0]["value"] > 0
