"""The contract every registered analyzer keeps (issue 11): a command exists with a flag per option, every option
is a diag.toml key of the same name, every metric it emits is declared and documented, its module imports
nothing heavy, and ``diag NAME`` and ``diag run --analyzers NAME`` give the same records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics.analyzers.registry import all_analyzers, analyzer_modules
from diagnostics.errors import DiagnosticsError
from diagnostics.spec import Analyzer, params_of

ANALYZERS = [a for a in all_analyzers().values() if isinstance(a, Analyzer)]
README = Path(__file__).resolve().parent.parent / "README.md"
HEAVY = ("torch", "pandas", "numpy", "scipy", "matplotlib", "pyarrow")
# Options that only make the contract run fast on the digits checkpoints (a new analyzer runs with its defaults).
QUICK: dict[str, list[str]] = {
    "hessian": ["--top-k", "2", "--tol", "1e-2"],
    "sharpness": ["--kind", "average", "--draws", "4"],
    "landscape": ["--dims", "1", "--steps", "5"],
    "rashomon": ["--samples", "200"],
}
# Analyzers whose contract run needs a model other than the digits classifier.
NOT_ON_DIGITS = {"bos"}


def ids(a: Analyzer) -> str:
    return a.name


@pytest.mark.parametrize("analyzer", ANALYZERS, ids=ids)
def test_command_has_a_flag_for_every_option(analyzer: Analyzer) -> None:
    res = CliRunner().invoke(app, [analyzer.name, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0, res.output
    for p in params_of(analyzer.config):
        if p.info.cli:
            assert p.flag in res.output, f"{analyzer.name}: {p.flag} missing from --help"


@pytest.mark.parametrize("analyzer", ANALYZERS, ids=ids)
def test_every_option_is_a_toml_key_of_the_same_name(analyzer: Analyzer) -> None:
    table = {p.name: p.default for p in params_of(analyzer.config) if p.info.toml and p.default not in (None, [])}
    cfg = analyzer.make_config(table)
    for name, value in table.items():
        assert getattr(cfg, name) == value
    with pytest.raises(DiagnosticsError, match=rf"unknown option 'no_such_option' in \[{analyzer.name}\]"):
        analyzer.make_config({"no_such_option": 1})


@pytest.mark.parametrize("analyzer", ANALYZERS, ids=ids)
def test_every_metric_is_declared_and_documented(analyzer: Analyzer) -> None:
    readme = README.read_text(encoding="utf-8")
    names = [m.name for m in analyzer.metrics]
    assert names and len(names) == len(set(names))
    for m in analyzer.metrics:
        assert len(m.definition) > 20, f"{analyzer.name}.{m.name}: define the metric"
        assert f"| `{m.name}` | {analyzer.name} |" in readme, f"README lacks {m.name} of {analyzer.name}: make readme"
    for section in analyzer.sections:
        assert set(section.metrics) <= set(names), (
            f"{analyzer.name}: section '{section.title}' draws undeclared metrics"
        )


def test_readme_tables_are_generated_from_the_declarations() -> None:
    from diag_cli import docs

    assert docs.main(["--check"]) == 0, "README.md is stale: run 'make readme'"


def test_analyzer_modules_import_nothing_heavy() -> None:
    code = (
        "import sys, importlib\n"
        f"for m in {analyzer_modules()!r}: importlib.import_module('diagnostics.analyzers.' + m)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _records(text: str) -> list[tuple]:
    rows = json.loads(text)
    rows = [(r["metric"], r["index"], r["group"], r["value"], r["stderr"]) for r in rows]
    return sorted(rows, key=lambda row: [(v is not None, v if v is not None else 0) for v in row])


@pytest.mark.parametrize("analyzer", [a for a in ANALYZERS if a.sweep and a.name not in NOT_ON_DIGITS], ids=ids)
def test_command_and_sweep_give_the_same_records(analyzer: Analyzer, digits_run: list[Path], tmp_path: Path) -> None:
    ck = digits_run[-1]
    quick = QUICK.get(analyzer.name, [])
    if analyzer.reference_option:  # diag run fills the reference with the run's first checkpoint: name it for both
        quick = [*quick, "--" + analyzer.reference_option.replace("_", "-"), str(ck)]
    # an analyzer swept with the previous checkpoint: "diag NAME CHECKPOINT PREVIOUS" is what the sweep computes
    given = [ck, digits_run[-2]] if analyzer.sweep_with == "previous" else [ck]
    single = CliRunner().invoke(app, [analyzer.name, *map(str, given), *quick, "--samples", "300", "-f", "json", "-q"])
    assert single.exit_code == 0, single.output
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for path in given:
        (run_dir / path.name).write_bytes(path.read_bytes())
    sets = [
        f"--set={analyzer.name}.{flag[2:].replace('-', '_')}={value}" for flag, value in zip(quick[::2], quick[1::2])
    ]
    swept = CliRunner().invoke(
        app,
        [
            "run",
            str(run_dir),
            "--analyzers",
            analyzer.name,
            *sets,
            "--samples",
            "300",
            "--out",
            str(tmp_path / "o"),
            "-f",
            "json",
            "-q",
        ],
    )
    assert swept.exit_code == 0, swept.output
    assert _records(single.stdout) == _records(swept.stdout)
