"""Data-parallel Hessian products on torch.distributed (gloo, CPU): two processes agree with one.

Two processes are spawned once per scenario on localhost (a free port from the OS, a hard timeout);
each writes its results to a file, and the parent compares them with a single-process run and with
exact float64 references (``torch.func.hessian``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics import distributed as D
from diagnostics.analyzers.hessian import HessianConfig, analyze_hessian
from diagnostics.context import Context
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg.data import DataLoop
from diagnostics.linalg.density import slq
from diagnostics.linalg.lanczos import lanczos
from diagnostics.linalg.operator import HessianOperator
from diagnostics.linalg.trace import hutchpp
from diagnostics.operators import hessian_operator

WORLD = 2
TIMEOUT_S = 90
N_SAMPLES = 37  # ragged: batches 10, 10, 10, 7; the rank boundary (18) cuts the second batch


# ------------------------------------------------------------------------------ the problem
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double().eval()


def _data(n: int = N_SAMPLES, batch: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=gen)
    return [(X[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _context(batches) -> Context:
    model = _model()
    return Context(
        model=model,
        params={k: v.detach() for k, v in model.named_parameters()},
        frozen={},
        batches=batches,
        loss_fn=nn.functional.cross_entropy,
        device=torch.device("cpu"),
        dtype=torch.float64,
        seed=3,
        checkpoint="toy",
    )


def _exact_hessian(batches) -> torch.Tensor:
    ctx = _context(batches)
    names = list(ctx.params)
    shapes = [ctx.params[k].shape for k in names]
    sizes = [ctx.params[k].numel() for k in names]
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def flat_loss(flat):
        parts = torch.split(flat, sizes)
        p = {k: t.reshape(s) for k, t, s in zip(names, parts, shapes)}
        return nn.functional.cross_entropy(functional_call(ctx.model, p, (X,)), y)

    return torch.func.hessian(flat_loss)(torch.cat([ctx.params[k].reshape(-1) for k in names]))


def _spectral(op: HessianOperator, full: bool = True) -> dict[str, Any]:
    """What the comparisons need from one operator (same seeds in every process).

    ``full`` adds block Lanczos, the exact trace (Hutch++ with a full sketch) and SLQ.
    """
    res = lanczos(op, k_top=4, k_bottom=1, tol=1e-10, generator=torch.Generator().manual_seed(5))
    tr = hutchpp(op, generator=torch.Generator().manual_seed(6), sketch=8, min_samples=16, max_samples=16)
    v = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = {
        "top": res.eigenvalues,
        "bottom": res.bottom_eigenvalues,
        "trace": tr.value,
        "HV": op.matmat(v),
    }
    if full:
        blk = lanczos(op, k_top=4, tol=1e-10, block_size=3, generator=torch.Generator().manual_seed(5))
        exact_tr = hutchpp(op, generator=torch.Generator().manual_seed(6), sketch=op.dim)
        q = slq(op, probes=2, steps=10, generator=torch.Generator().manual_seed(7), block=2)
        out.update(
            block_top=blk.eigenvalues,
            exact_trace=exact_tr.value,
            nodes=torch.cat(q.nodes),
            weights=torch.cat(q.weights),
        )
    out["hvps"] = op.hvp_count
    return out


def _scenarios(rank: int, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    batches = _data()
    ctx = _context(batches)
    # replicated data, ragged split, through hessian_operator (sharded by default in a group; auto-detected)
    op = hessian_operator(ctx)
    out["replicated_sharded"] = op.loop.sharded
    out["replicated"] = _spectral(op)
    out["replicated_local_samples"] = sum(len(b[1]) for b in op.loop.batches)
    # micro-batched on top of the shard
    op = hessian_operator(ctx, micro_batch=6)
    out["micro"] = _spectral(op, full=False)
    # pre-sharded: every rank brings its own, different part (unequal sizes: 25 and 12 samples)
    cut = 25
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    mine = [(X[:cut], y[:cut])] if rank == 0 else [(X[cut:][:6], y[cut:][:6]), (X[cut + 6 :], y[cut + 6 :])]
    shard = D.shard_data(mine)
    out["presharded_mode"] = shard.mode
    loop = DataLoop(shard.batches, shard.weights, reduce=D.all_reduce_sum)
    op = HessianOperator(ctx.batch_loss, ctx.params, loop)
    out["presharded"] = _spectral(op, full=False)
    # one sample for two ranks: rank 0 holds nothing and still takes part
    tiny = _data(n=1)
    op = hessian_operator(_context(tiny))
    out["tiny_local"] = len(op.loop.batches)
    out["tiny_HV"] = op.matmat(torch.eye(op.dim, dtype=torch.float64)[:, :5])
    # the analyzer end to end (records identical on every rank)
    cfg = HessianConfig(top_k=3, tol=1e-10, trace=True, trace_rtol=0.0, trace_samples=12)
    result = analyze_hessian(cfg, ctx)
    out["records"] = [(r.metric, r.index, r.value) for r in result.records]
    # inside local_only nothing is sharded or reduced (a sweep's per-checkpoint analysis) ...
    with D.local_only():
        op = hessian_operator(ctx)
        out["local_only_batches"] = len(op.loop.batches)
        out["local_only_reduce"] = op.reduce is None
    # ... and an operator keeps the sharding it was built with, wherever it is used
    local = hessian_operator(ctx, shard=False)
    out["local_only_kept"] = local.matmat(torch.eye(local.dim, dtype=torch.float64)[:, :2])
    out["sharded_kept"] = op_sharded_in_local_only(ctx)
    # an error on one rank: every rank raises (none waits in the all-reduce), rank 1 its own error
    out["vote"] = _vote(ctx, rank)
    # a sweep: items spread over ranks, results gathered in order
    items = [f"ckpt{i}" for i in range(5)]
    mine_items = D.shard_items(items)
    out["my_items"] = [i for i, _ in mine_items]
    out["gathered"] = D.gather_items([(i, f"{it}@{rank}") for i, it in mine_items], n_items=len(items))
    return out


def op_sharded_in_local_only(ctx: Context) -> torch.Tensor:
    op = hessian_operator(ctx)  # built sharded ...
    with D.local_only():  # ... it stays sharded inside local_only
        return op.matmat(torch.eye(op.dim, dtype=torch.float64)[:, :2])


def _vote(ctx: Context, rank: int) -> str:
    def loss(p, b):
        if rank == 1:
            raise RuntimeError("rank 1 broke")
        return ctx.batch_loss(p, b)

    op = HessianOperator(loss, ctx.params, hessian_operator(ctx).loop, backend="reverse", memory_check=False)
    try:
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
    except (RuntimeError, DiagnosticsError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(rank: int, size: int, port: int, folder: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    w = D.init_from_env(timeout_s=TIMEOUT_S)
    assert (w.rank, w.size) == (rank, size) and D.data_parallel_active()
    try:
        result = _scenarios(rank, size)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
        torch.distributed.barrier()  # every rank has saved before any tears the group (and rank 0's store) down
    finally:
        D.shutdown()
    # Leave without the interpreter's teardown: gloo's threads, destroyed there as C++ statics, abort the
    # process now and then ("terminate called without an active exception", SIGABRT) after all the work is
    # done and saved. The `diag` console script exits the same way (diag_cli.main.main).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(folder: Path, size: int = WORLD) -> list[dict[str, Any]]:
    ctx = mp.start_processes(
        _worker, args=(size, _free_port(), str(folder)), nprocs=size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(size)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    ranks = _spawn(tmp_path_factory.mktemp("dist"))
    torch.set_num_threads(1)
    single = _scenarios(0, 1)
    return ranks, single


# -------------------------------------------------------------------------------- the tests
def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def test_every_rank_computes_the_same_bits(runs):
    (r0, r1), _ = runs
    for key in ("replicated", "micro", "presharded"):
        for field in ("top", "bottom", "HV", "block_top", "nodes", "weights"):
            if field in r0[key]:
                assert torch.equal(r0[key][field], r1[key][field]), (key, field)
        assert r0[key]["trace"] == r1[key]["trace"]
    assert r0["records"] == r1["records"]


@pytest.mark.parametrize("key", ["replicated", "micro", "presharded"])
def test_two_processes_equal_one(runs, key):
    (r0, _), single = runs
    two, one = r0[key], single["replicated"]
    assert _rel(two["HV"], one["HV"]) < 1e-12
    for field in ("top", "bottom", "trace", "block_top", "exact_trace", "nodes"):
        if field in two:
            assert _rel(two[field], one[field]) < 1e-6, field
    if key == "replicated":
        assert two["hvps"] == one["hvps"]  # a product over shards counts once


def test_distributed_results_are_exact(runs):
    (r0, _), _ = runs
    H = _exact_hessian(_data())
    ev = torch.linalg.eigvalsh(H)
    assert _rel(r0["replicated"]["top"], ev.flip(0)[:4]) < 1e-8
    assert _rel(r0["replicated"]["bottom"], ev[:1]) < 1e-8
    assert _rel(r0["replicated"]["block_top"], ev.flip(0)[:4]) < 1e-8
    assert r0["replicated"]["exact_trace"] == pytest.approx(float(torch.trace(H)), rel=1e-10)
    v = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert _rel(r0["replicated"]["HV"], H @ v) < 1e-12


def test_ragged_split_is_balanced_and_complete(runs):
    (r0, r1), _ = runs
    assert r0["replicated_local_samples"] + r1["replicated_local_samples"] == N_SAMPLES
    assert {r0["replicated_local_samples"], r1["replicated_local_samples"]} == {18, 19}
    assert r0["presharded_mode"] == r1["presharded_mode"] == "presharded"


def test_an_error_on_one_rank_is_raised_on_every_rank(runs):
    (r0, r1), _ = runs
    assert r1["vote"] == "RuntimeError: rank 1 broke"
    assert r0["vote"].startswith("DiagnosticsError: another process failed")


def test_a_rank_without_data_still_takes_part(runs):
    (r0, r1), _ = runs
    assert (r0["tiny_local"], r1["tiny_local"]) == (0, 1)
    H = _exact_hessian(_data(n=1))
    assert _rel(r0["tiny_HV"], H[:, :5]) < 1e-12
    assert torch.equal(r0["tiny_HV"], r1["tiny_HV"])


def test_analyzer_records_match_single_process(runs):
    (r0, _), single = runs
    assert [(m, i) for m, i, _ in r0["records"]] == [(m, i) for m, i, _ in single["records"]]
    for (_, _, a), (_, _, b) in zip(r0["records"], single["records"]):
        assert a == pytest.approx(b, rel=1e-6)


def test_local_only_and_sweep_helpers(runs):
    (r0, r1), single = runs
    assert r0["replicated_sharded"] and r1["replicated_sharded"] and not single["replicated_sharded"]
    assert r0["local_only_batches"] == 4 and r0["local_only_reduce"]
    H = _exact_hessian(_data())
    for r in (r0, r1):
        assert _rel(r["local_only_kept"], H[:, :2]) < 1e-12
        assert _rel(r["sharded_kept"], H[:, :2]) < 1e-12
    assert torch.equal(r0["sharded_kept"], r1["sharded_kept"])
    assert r0["my_items"] == [0, 2, 4] and r1["my_items"] == [1, 3]
    expected = ["ckpt0@0", "ckpt1@1", "ckpt2@0", "ckpt3@1", "ckpt4@0"]
    assert r0["gathered"] == r1["gathered"] == expected


# ------------------------------------------------------------------- single-process helpers
def test_shard_batches_cover_every_sample_once():
    batches = _data()
    sizes = []
    for size in (1, 2, 3, 5):
        pieces = [D.shard_batches(batches, r, size) for r in range(size)]
        X = torch.cat([b[0] for part, _ in pieces for b in part])
        assert torch.equal(X, torch.cat([b[0] for b in batches]))
        weights = [w for _, ws in pieces for w in ws]
        assert sum(weights) == pytest.approx(1.0, abs=1e-15)
        counts = [sum(len(b[1]) for b in part) for part, _ in pieces]
        assert max(counts) - min(counts) <= 1
        sizes.append(counts)
    assert sizes[1] == [18, 19]


def test_without_a_process_group_everything_is_local():
    assert D.world().size == 1 and D.is_main() and not D.data_parallel_active()
    assert D.shard_items(["a", "b"]) == [(0, "a"), (1, "b")]
    assert D.gather_items([(1, "b"), (0, "a")], n_items=2) == ["a", "b"]
    t = torch.ones(3)
    assert D.all_reduce_sum(t) is t
    assert D.init_from_env().size == 1  # no torchrun environment: nothing is initialised


def test_fingerprint_tells_data_apart():
    a, b = _data(), _data()
    assert D.data_fingerprint(a) == D.data_fingerprint(b)
    b[1] = (b[1][0].clone(), b[1][1].clone())
    b[1][0][0, 0] += 1e-12
    assert D.data_fingerprint(a) != D.data_fingerprint(b)


# ------------------------------------------------------------------------- the CLI on torchrun
def torchrun_two(*args: str, cwd: Path) -> list:
    """``torchrun --nproc_per_node 2 diag ARGS`` (one thread each) -> the JSON records it printed."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "DIAG_DIST_TIMEOUT": str(TIMEOUT_S), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "diag_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S + 30,
        env=env,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_diag_hessian_under_torchrun_matches_one_process(digits_run, tmp_path):
    """``torchrun --nproc_per_node 2 diag hessian``: rank 0 alone prints and writes; same numbers."""
    ckpt = digits_run[-1]
    args = ["hessian", str(ckpt), "--top-k", "2", "--trace", "--trace-samples", "20", "--dtype", "float64"]
    args += ["--samples", "300", "--batch-size", "128", "--format", "json", "--tol", "1e-8"]
    out_file = tmp_path / "two.json"
    two = torchrun_two(*args, "--out", str(out_file), cwd=tmp_path)  # exactly one JSON array: rank 1 printed nothing
    written = json.loads(out_file.read_text())
    assert written["records"] == two
    assert written["metadata"]["processes"] == 2
    one = json.loads(CliRunner().invoke(app, args, catch_exceptions=False).stdout)
    assert [(r["metric"], r["index"]) for r in two] == [(r["metric"], r["index"]) for r in one]
    for a, b in zip(two, one):
        assert a["value"] == pytest.approx(b["value"], rel=1e-6), a["metric"]


# ------------------------------------------------------------------ sweeps spread over ranks
def test_diag_run_under_torchrun_spreads_checkpoints_and_equals_one_process(digits_run, tmp_path):
    """``torchrun --nproc_per_node 2 diag run``: each rank analyses every other checkpoint, rank 0 writes
    one table equal to a single-process sweep; the cache then serves a single-process rerun."""
    run_dir = digits_run[0].parent
    common = ["--analyzers", "hessian", "--set", "hessian.top_k=2", "--samples", "200", "--dtype", "float64"]
    two_dir = tmp_path / "two"
    two = torchrun_two("run", str(run_dir), *common, "--out", str(two_dir), "--format", "json", "--quiet", cwd=tmp_path)
    one_res = CliRunner().invoke(
        app, ["run", str(run_dir), *common, "--out", str(tmp_path / "one"), "--format", "json", "-q"]
    )
    assert one_res.exit_code == 0, one_res.output
    one = json.loads(one_res.stdout)
    assert [(r["checkpoint"], r["metric"], r["index"]) for r in two] == [
        (r["checkpoint"], r["metric"], r["index"]) for r in one
    ]
    for a, b in zip(two, one):
        assert a["value"] == pytest.approx(b["value"], rel=1e-10)
    assert len({r["checkpoint"] for r in two}) == len(digits_run)
    # both ranks filled the shared cache: a single-process rerun into the same folder computes nothing
    again = CliRunner().invoke(app, ["run", str(run_dir), *common, "--out", str(two_dir), "-q"])
    assert again.exit_code == 0 and "0 computed" in again.stdout, again.stdout
