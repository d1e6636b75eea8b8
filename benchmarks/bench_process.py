"""Whole-process benchmark, A/B alternated: ``diag hessian --top-k 5`` against a PyHessian script on the same model,
data and tolerance, each a fresh Python process (imports, data, model and the eigensolver all count); and
``diag --help`` against ``python -c "import torch"``.

The model is the issue's 1.13M-parameter digits MLP (64-1024-1024-10, tanh; 1,126,410 parameters) over all 1,797
scikit-learn digits, float32, cross-entropy, top-5 eigenvalues at tolerance 1e-3. Each child's wall time and peak
resident memory (``ru_maxrss`` from ``os.wait4``) are recorded; runs alternate A, B, A, B, ... and the medians and
their ratios are printed (and written as CSV with ``--csv``).

A third process, ``floor``, does only what both must do before any product: import torch and the user's factories,
build the data and load the model from the checkpoint. After the timed rounds, one untimed run of each counts its
HVPs (diag's from its result file, PyHessian's by wrapping ``pyhessian.hessian.hessian_vector_product``). With
``h = (PyHessian - floor) / its HVPs``, the time of one PyHessian HVP and its loop, the script prints the ceiling
``PyHessian / (floor + diag's HVPs * h)``: the speed-up of a diag that spent nothing beyond the floor and its HVPs.

    .venv/bin/python benchmarks/bench_process.py [--repeats 5] [--csv benchmarks/results/process.csv]
"""

from __future__ import annotations

import argparse
import compileall
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FACTORIES = '''
import torch
from sklearn.datasets import load_digits


def data():
    """All 1,797 digits, scaled to [0, 1]."""
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
'''

PYHESSIAN = """
import sys, json
import torch
sys.path.insert(0, {folder!r})
from factories import data
from diagnostics.examples.digits import build_mlp
from pyhessian import hessian

model = build_mlp(width=1024, depth=2)
model.load_state_dict(torch.load({ckpt!r}, weights_only=True)["model"])
model.eval()
X, y = data()
torch.manual_seed(0)
h = hessian(model, torch.nn.CrossEntropyLoss(), data=(X, y), cuda=False)
eig, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=5)
print(json.dumps(sorted(eig, reverse=True)))
"""

# the floor: what diag and the PyHessian script both do before their first product
FLOOR = """
import sys
import torch
sys.path.insert(0, {folder!r})
from factories import data
from diagnostics.examples.digits import build_mlp

model = build_mlp(width=1024, depth=2)
model.load_state_dict(torch.load({ckpt!r}, weights_only=True)["model"])
X, y = data()
"""

# the PyHessian script once more, counting its products (untimed)
PH_COUNT = """
import json, sys
sys.path.insert(0, {benchmarks!r})
from pyhessian_products import counted_products

with counted_products() as calls:
    exec(open({script!r}).read())
print(json.dumps({{"hvps": calls["n"]}}))
"""


# forks and execs argv[2:], waits for it and writes its peak RSS (KB) to the file argv[1]
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def rss_of(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``cmd`` -> (wall seconds, the child's own peak RSS in MB, stdout).

    Linux counts the memory a process had before ``exec`` in its peak RSS, so a child forked from this
    (large: it imported torch to train the model) process would carry this process's RSS. ``cmd`` therefore
    runs under :data:`LAUNCHER`, a bare Python that forks and execs it and reads its ``ru_maxrss`` with
    ``wait4``: the launcher's own ~10 MB is all a command can inherit.
    """
    fd, report = tempfile.mkstemp(prefix="rss_", suffix=".txt")
    os.close(fd)
    t0 = time.perf_counter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.chdir(cwd)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(r)
        os.execv(sys.executable, [sys.executable, "-S", "-c", LAUNCHER, report, *cmd])
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status, _ = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed with status {status}")
    maxrss_kb = int(Path(report).read_text())
    os.unlink(report)
    return wall, maxrss_kb / 1024, b"".join(chunks).decode()


def count_hvps(diag: list[str], ph_count: list[str], folder: Path) -> dict[str, int]:
    """HVPs of one untimed run of each: diag's from its result file's metadata, PyHessian's by the counting
    wrapper."""
    result = folder / "hvps.json"
    rss_of([*diag, "-o", str(result), "--force"], folder)
    meta = json.loads(result.read_text())["metadata"]
    _, _, out = rss_of(ph_count, folder)
    return {"diag hessian": int(meta["hvp_count"]), "pyhessian": int(json.loads(out.splitlines()[-1])["hvps"])}


def issue_model(X: Any, y: Any) -> Any:
    """The issue's 1.13M-parameter MLP (64-1024-1024-10, tanh): seeded init, 50 SGD steps at lr 0.05 on ``(X, y)``."""
    import torch

    from diagnostics.examples.digits import build_mlp

    model = build_mlp(width=1024, depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


def prepare(folder: Path) -> Path:
    """The factories module and a checkpoint of the 1.13M-parameter MLP (seeded init, briefly trained)."""

    from diagnostics.checkpoint import save_checkpoint

    # byte-compile the package as a wheel install does (pip compiles on install); an editable install under
    # PYTHONDONTWRITEBYTECODE=1 (set on these machines) would otherwise compile ~60 modules on every start
    root = Path(__file__).resolve().parents[1]
    for package in ("diagnostics", "cli"):
        compileall.compile_dir(root / package, quiet=1)
    (folder / "factories.py").write_text(FACTORIES)
    sys.path.insert(0, str(folder))
    from factories import data  # type: ignore[import-not-found]

    X, y = data()
    model = issue_model(X, y)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n:,} parameters, {len(y)} samples")
    return save_checkpoint(folder / "mlp.pt", model, model_factory="diagnostics.examples.digits:build_mlp",
                           model_kwargs={"width": 1024, "depth": 2})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = prepare(folder)
        (folder / "ph.py").write_text(PYHESSIAN.format(folder=str(folder), ckpt=str(ckpt)))
        (folder / "floor.py").write_text(FLOOR.format(folder=str(folder), ckpt=str(ckpt)))
        bench = str(Path(__file__).resolve().parent)
        (folder / "ph_count.py").write_text(PH_COUNT.format(benchmarks=bench, script=str(folder / "ph.py")))
        cases = {
            "diag hessian": [
                py,
                "-m",
                "diag_cli.main",
                "hessian",
                str(ckpt),
                "--data",
                "factories.py:data",
                "--top-k",
                "5",
                "-q",
                "-f",
                "json",
            ],
            "pyhessian": [py, "ph.py"],
            "floor": [py, "floor.py"],
            "diag --help": [py, "-m", "diag_cli.main", "--help"],
            "import torch": [py, "-c", "import torch"],
        }
        rows, answers = [], {}
        for rep in range(args.repeats):
            for name, cmd in cases.items():
                wall, rss, out = rss_of(cmd, folder)
                rows.append({"repeat": rep, "case": name, "seconds": wall, "peak_rss_mb": rss})
                answers.setdefault(name, out)
                print(f"  [{rep}] {name:<13} {wall:7.2f} s  {rss:7.0f} MB", flush=True)
        hvps = count_hvps(cases["diag hessian"], [py, "ph_count.py"], folder)
    ours = [r["value"] for r in json.loads(answers["diag hessian"]) if r["metric"] == "eigenvalue"]
    print("top-5 eigenvalues, diag:     ", " ".join(f"{v:.6g}" for v in ours))
    print("top-5 eigenvalues, PyHessian:", " ".join(f"{v:.6g}" for v in json.loads(answers["pyhessian"])))
    med = {name: (statistics.median(r["seconds"] for r in rows if r["case"] == name),
                  statistics.median(r["peak_rss_mb"] for r in rows if r["case"] == name)) for name in cases}  # fmt: skip
    print("\nmedians over", args.repeats, "alternated repeats")
    for name, (s, m) in med.items():
        print(f"  {name:<13} {s:7.2f} s  {m:7.0f} MB")
    print(f"speed-up diag vs PyHessian: {med['pyhessian'][0] / med['diag hessian'][0]:.2f}x; "
          f"peak RSS ratio diag/PyHessian: {med['diag hessian'][1] / med['pyhessian'][1]:.2f}; "
          f"diag --help / import torch: {med['diag --help'][0] / med['import torch'][0]:.2f}")  # fmt: skip
    floor, ph = med["floor"][0], med["pyhessian"][0]
    h = (ph - floor) / hvps["pyhessian"]
    print(f"HVPs: diag {hvps['diag hessian']}, PyHessian {hvps['pyhessian']} ({h:.3f} s each with its loop); "
          f"the floor (imports, data, model) {floor:.2f} s, {med['floor'][1]:.0f} MB")  # fmt: skip
    print(f"ceiling: a diag spending only the floor and its {hvps['diag hessian']} HVPs would be "
          f"{ph / (floor + hvps['diag hessian'] * h):.2f}x faster than PyHessian; 3x needs at most "
          f"{(ph / 3 - floor) / h:.1f} HVPs and nothing else")  # fmt: skip
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
