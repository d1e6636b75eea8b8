"""transformers models, Trainer runs, dict/tuple/numpy batches, token-level losses and sequence features.

Each failure of issue 12 has a test here that runs the command that used to fail. The exact references
are independent of diag's code: transformers' own ``from_pretrained`` loads the folder for the dense
float64 Hessian, and the token-weighted loss is written out from the logits.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import hfmodels as hm
import tinymodels as tm
from cliutils import one_line_error
from diag_cli.main import app
from diagnostics.binding import Binding
from diagnostics.checkpoint import load_checkpoint, read_checkpoint_file
from diagnostics.context import build_context, compare_outputs
from diagnostics.errors import DiagnosticsError

if os.environ.get("CI") == "true":  # CI installs the [hf] extra: these tests must run there, never skip
    import transformers
else:
    transformers = pytest.importorskip("transformers")
runner = CliRunner()
F64 = torch.float64


def diag(*args: str):
    return runner.invoke(app, [str(a) for a in args])


TOP2_FLOAT64 = ("--dtype", "float64", "--top-k", "2", "--tol", "1e-10", "-f", "json")


def top_eigenvalues(result) -> list[float]:
    """The ``eigenvalue`` records of a JSON result, largest first."""
    return sorted((r["value"] for r in records(result) if r["metric"] == "eigenvalue"), reverse=True)


def records(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    start = result.stdout.index("[")
    return json.loads(result.stdout[start:])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A save_pretrained folder of a tiny GPT-2 whose lm_head is tied to the embedding (not stored)."""
    hm.build_gpt().save_pretrained(tmp_path / "gpt")
    return tmp_path / "gpt"


def sharded_copy(folder: Path, out: Path) -> Path:
    """The folder with its weights split over two shards and a model.safetensors.index.json, as
    save_pretrained writes for large models."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# ------------------------------------------------------------------------------ exact references
def token_weighted_loss(model, batches, flat: torch.Tensor, names, shapes) -> torch.Tensor:
    """Sum of the shifted next-token cross-entropies over every counted token, divided by their number."""
    params, start = {}, 0
    for n, s in zip(names, shapes):
        k = math.prod(s)
        params[n] = flat[start : start + k].reshape(s)
        start += k
    total, count = 0.0, 0
    for b in batches:
        logits = torch.func.functional_call(
            model, params, (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        ).logits
        y = b["labels"][:, 1:]
        total = total + F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum"
        )
        count += int((y != -100).sum())
    return total / count


def sequence_weighted_loss(model, batches, flat, names, shapes) -> torch.Tensor:
    """The wrong weighting (each batch by its number of sequences), to show the test can tell them apart."""
    n = sum(b["input_ids"].shape[0] for b in batches)
    return sum(token_weighted_loss(model, [b], flat, names, shapes) * b["input_ids"].shape[0] / n for b in batches)


def dense_top2(folder: Path, loss=token_weighted_loss) -> list[float]:
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    ref = ref.double().eval()
    names = [n for n, _ in ref.named_parameters()]  # tied lm_head.weight appears once
    shapes = [tuple(p.shape) for _, p in ref.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in ref.named_parameters()])
    batches = hm.gpt_batches()
    H = torch.autograd.functional.hessian(lambda w: loss(ref, batches, w, names, shapes), flat)
    return sorted(torch.linalg.eigvalsh((H + H.T) / 2).tolist(), reverse=True)[:2]


# ------------------------------------------------------------------------------ model folders
def test_save_pretrained_folder_top2_equals_dense_token_weighted_hessian(folder: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        stored = set(fh.keys())
    assert "lm_head.weight" not in stored  # tied: saved once, under the embedding's name
    exact = dense_top2(folder)
    wrong = dense_top2(folder, sequence_weighted_loss)
    assert abs(wrong[0] - exact[0]) > 1e-3 * abs(exact[0])  # the weighting matters for these batches
    for path in (folder, sharded_copy(folder, tmp_path / "sharded")):
        res = diag("hessian", path, "--data", "hfmodels:gpt_batches", *TOP2_FLOAT64)
        assert top_eigenvalues(res) == pytest.approx(exact, rel=1e-7, abs=1e-9)


def test_folder_context_states_token_weighting(folder: Path) -> None:
    ctx = build_context(load_checkpoint(folder), _binding(folder, "hfmodels:gpt_batches"), dtype="float64")
    assert ctx.loss_name == "model" and ctx.shifted_labels and ctx.token_weighted
    counted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in hm.gpt_batches())
    assert ctx.counted == counted
    from diagnostics.context import describe_context

    meta = describe_context(ctx)
    assert meta["loss_weighting"].startswith("tokens:") and meta["counted_targets"] == counted
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).double().eval()
    names = [n for n, _ in ref.named_parameters()]
    shapes = [tuple(p.shape) for _, p in ref.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in ref.named_parameters()])
    want = float(token_weighted_loss(ref, hm.gpt_batches(), flat, names, shapes))
    assert float(ctx.loss()) == pytest.approx(want, rel=1e-12)
    # micro-batches of one sequence (some with few counted tokens) give the same Hessian products
    from diagnostics.operators import hessian_operator

    v = torch.randn(ctx.n_params, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    whole = hessian_operator(ctx).matmat(v)
    micro = hessian_operator(ctx, micro_batch=1, backend="reverse").matmat(v)
    assert torch.allclose(whole, micro, rtol=1e-9, atol=1e-12)


def _binding(folder: Path, data: str, **kw) -> Binding:
    from diagnostics.binding import resolve_binding

    return resolve_binding(load_checkpoint(folder).factories, data=data, **kw)


def test_folder_without_transformers_names_the_extra(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    res = diag("hessian", folder, "--data", "hfmodels:gpt_batches")
    one_line_error(res, "transformers", "pip install 'training-diagnostics[hf]'")


def test_auto_map_folder_runs_no_code(folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass EvilModel: pass\n"
    (folder / "modeling_evil.py").write_text(code)
    (folder / "configuration_evil.py").write_text(code)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    res = diag("hessian", folder, "--data", "hfmodels:gpt_batches", "-f", "json")
    assert res.exit_code == 0, res.output
    assert "auto_map (code shipped with the folder) is ignored" in res.output
    assert not marker.exists()
    cfg["model_type"] = "evil_gpt"  # a type transformers does not define: refused, still no code run
    (folder / "config.json").write_text(json.dumps(cfg))
    res = diag("hessian", folder, "--data", "hfmodels:gpt_batches")
    one_line_error(res, "auto_map", "evil_gpt", "code from a checkpoint never runs")
    assert not marker.exists()


# ------------------------------------------------------------------------------ Trainer runs
class _Payload:
    """Unpickling this object writes a marker file: a stand-in for code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diagnostics.examples.tiny_gpt import train_trainer

    out = tmp_path_factory.mktemp("trainer") / "run"
    train_trainer(out, lr=2e-3, steps=4, save_every=2, n_embd=8)
    return out


def test_trainer_run_is_swept_with_its_steps(trainer_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    for ck in trainer_run.glob("checkpoint-*"):
        for name in ("training_args.bin", "rng_state.pth", "scheduler.pt"):
            assert (ck / name).exists()
            (ck / name).write_bytes(pickle.dumps(_Payload(marker)))
    from diagnostics.runs import discover_checkpoints

    found = discover_checkpoints(trainer_run)
    assert [(c.name, c.step, c.step_source) for c in found] == [
        ("checkpoint-2", 2, "metadata"),
        ("checkpoint-4", 4, "metadata"),
    ]
    ck = load_checkpoint(trainer_run / "checkpoint-4")
    assert ck.lr == pytest.approx(2e-3) and ck.metadata["optimizer"]["name"] in ("Adam", "AdamW")
    res = diag(
        "run",
        trainer_run,
        "--data",
        "diagnostics.examples.tiny_gpt:zen_batches",
        "--analyzers",
        "hessian",
        "--out",
        tmp_path / "out",
        "-f",
        "json",
    )
    rows = records(res)
    assert sorted({(r["checkpoint"], r["step"]) for r in rows}) == [("checkpoint-2", 2), ("checkpoint-4", 4)]
    assert not marker.exists()


def test_trainer_optimizer_state_is_matched_to_names(trainer_run: Path) -> None:
    ck = load_checkpoint(trainer_run / "checkpoint-4")
    raw = torch.load(trainer_run / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert len(raw["param_groups"]) == 2 and "param_names" not in raw["param_groups"][0]
    ctx = build_context(ck, _binding(trainer_run / "checkpoint-4", "diagnostics.examples.tiny_gpt:zen_batches"))
    groups = ctx.optimizer_state["param_groups"]
    names = [n for g in groups for n in g["param_names"]]
    assert names == list(ctx.params)  # named_parameters() order
    state = ctx.optimizer_state["state"]
    for g in groups:
        for pid, name in zip(g["params"], g["param_names"]):
            assert state[pid]["exp_avg_sq"].shape == ctx.params[name].shape
    # the Trainer's first group (weight decay) holds the embedding; biases and LayerNorms are in the second
    first = raw["param_groups"][0]["params"][0]
    assert torch.equal(state[first]["exp_avg_sq"], raw["state"][first]["exp_avg_sq"])
    wte = next(
        g["params"][g["param_names"].index("transformer.wte.weight")]
        for g in groups
        if "transformer.wte.weight" in g["param_names"]
    )
    assert wte == first
    res = diag(
        "sharpness",
        trainer_run / "checkpoint-4",
        "--data",
        "diagnostics.examples.tiny_gpt:zen_batches",
        "--kind",
        "worst",
        "--max-iter",
        "2",
        "--restarts",
        "1",
        "-f",
        "json",
    )
    rows = {r["metric"]: r["value"] for r in records(res)}
    assert rows["eos_threshold"] == pytest.approx(38 / 2e-3)
    assert rows["preconditioned_eigenvalue"] > 0 and rows["eos_ratio"] == pytest.approx(
        rows["preconditioned_eigenvalue"] / rows["eos_threshold"]
    )


# ------------------------------------------------------------------------------ sequence features
def _pooled_by_hand(folder: Path, pool: str) -> torch.Tensor:
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).double().eval()
    rows, seen = [], []
    hook = ref.transformer.h[0].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    for b in hm.gpt_batches():
        with torch.no_grad():
            ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        hidden = seen.pop().double()  # the output of block 0, [B, T, D]
        m = b["attention_mask"].double()
        if pool == "mean":
            rows.append((hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True))
        else:
            last = b["attention_mask"].sum(1) - 1  # right padding: the last real token
            rows.append(hidden[torch.arange(hidden.shape[0]), last])
    hook.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_token_pooled_rankme_matches_hand_computation(folder: Path, pool: str) -> None:
    Z = _pooled_by_hand(folder, pool)
    s = torch.linalg.svdvals(Z)
    p = s / s.sum() + 1e-7
    want = float(torch.exp(-(p * p.log()).sum()))
    res = diag(
        "rankme",
        folder,
        "--data",
        "hfmodels:gpt_batches",
        "--layer",
        "transformer.h.0",
        "--pool",
        pool,
        "--dtype",
        "float64",
        "-f",
        "json",
    )
    got = {r["metric"]: r["value"] for r in records(res)}
    assert got["rankme"] == pytest.approx(want, rel=1e-9)
    assert "its first tensor" in res.output or "returns a" not in res.output


def test_token_features_without_pool_name_the_axes(folder: Path) -> None:
    res = diag("rankme", folder, "--data", "hfmodels:gpt_batches", "--layer", "transformer.h.0")
    one_line_error(res, "[batch 3, tokens 6, features 4]", "--pool mean")


# ------------------------------------------------------------------------------ the failures of the issue
def test_model_safetensors_with_a_factory_loads_tied_weights(folder: Path) -> None:
    # was: exit 2 "missing 1 key ['lm_head.weight']"
    res = diag(
        "hessian",
        folder / "model.safetensors",
        "--model",
        "hfmodels:build_gpt",
        "--data",
        "hfmodels:gpt_batches",
        *TOP2_FLOAT64,
    )
    assert top_eigenvalues(res) == pytest.approx(dense_top2(folder), rel=1e-7)


def test_dynamic_cache_is_no_false_nondeterminism(tmp_path: Path) -> None:
    # was: "the model gives different outputs for the same batch in eval mode" (== on a DynamicCache)
    model = hm.build_gpt(use_cache=True).eval()
    b = hm.gpt_inputs_only()[0]
    with torch.no_grad():
        a, c = model(**b, use_cache=True), model(**b, use_cache=True)
    assert type(a.get("cache", a.get("past_key_values"))).__name__ == "DynamicCache"
    assert compare_outputs(a, c).agree
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    res = diag(
        "hessian",
        tmp_path / "plain.pt",
        "--model",
        "hfmodels:build_gpt",
        "--data",
        "hfmodels:gpt_batches",
        "-f",
        "json",
    )
    assert records(res)[0]["metric"] == "eigenvalue"


def test_builtin_cross_entropy_on_token_logits(folder: Path) -> None:
    # was: "unexpected RuntimeError: Expected target size"
    ctx = build_context(
        load_checkpoint(folder), _binding(folder, "hfmodels:gpt_token_targets", loss="cross_entropy"), dtype="float64"
    )
    assert ctx.loss_name == "cross_entropy" and ctx.token_weighted
    model_ctx = build_context(load_checkpoint(folder), _binding(folder, "hfmodels:gpt_batches"), dtype="float64")
    # the same next-token targets, shifted in the data instead of by the model: the same token-mean loss
    assert float(ctx.loss()) == pytest.approx(float(model_ctx.loss()), rel=1e-12)


def test_dict_tuple_and_numpy_layouts(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tm.build_tiny().state_dict(), path)
    # {image, label} dicts for a forward(x) model: the input is passed positionally, with a note
    res = diag("hessian", path, "--model", "tinymodels:build_tiny", "--data", "hfmodels:image_dicts", "-f", "json")
    assert records(res) and "passed positionally" in res.output
    # numpy arrays (float64 inputs, int32 labels) give what the same torch tensors give
    np_res = diag(
        "hessian",
        path,
        "--model",
        "tinymodels:build_tiny",
        "--data",
        "hfmodels:numpy_data",
        "--dtype",
        "float64",
        "-f",
        "json",
    )
    t_res = diag(
        "hessian",
        path,
        "--model",
        "tinymodels:build_tiny",
        "--data",
        "hfmodels:torch_data",
        "--dtype",
        "float64",
        "-f",
        "json",
    )
    assert records(np_res)[0]["value"] == pytest.approx(records(t_res)[0]["value"], rel=1e-10)
    # (ids, mask) pairs are two inputs, not (inputs, targets)
    ids_path = tmp_path / "ids.pt"
    torch.save(hm.build_ids_mask_model().state_dict(), ids_path)
    res = diag(
        "rankme",
        ids_path,
        "--model",
        "hfmodels:build_ids_mask_model",
        "--data",
        "hfmodels:ids_mask_pairs",
        "--layer",
        "encoder",
        "--pool",
        "mean",
        "-f",
        "json",
    )
    assert records(res) and "(token ids, 0/1 mask)" in res.output


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["hessian", "--data", "hfmodels:gpt_inputs_only"], ["input_ids, attention_mask", "--targets KEY"]),
        (
            ["hessian", "--data", "hfmodels:gpt_batches", "--inputs", "input_ids,tokens"],
            ["--inputs tokens", "input_ids, attention_mask, labels"],
        ),
        (
            ["hessian", "--data", "hfmodels:gpt_batches", "--targets", "answer"],
            ["--targets 'answer'", "input_ids, attention_mask, labels"],
        ),
        (["hessian", "--data", "hfmodels:gpt_batches", "--loss", "mse"], ["loss 'mse'", "[3, 6, 7]", "--loss"]),
        (
            [
                "rankme",
                "--data",
                "hfmodels:gpt_batches",
                "--layer",
                "transformer.h.0",
                "--pool",
                "first",
                "--inputs",
                "input_ids",
            ],
            None,
        ),
    ],
)
def test_bad_layouts_exit_2_with_one_line(folder: Path, args: list[str], fragments) -> None:
    res = diag(args[0], folder, *args[1:])
    if fragments is None:  # a valid layout for comparison: --inputs picks keys, first token pooling
        assert res.exit_code == 0, res.output
        return
    one_line_error(res, *fragments)


def test_model_errors_name_the_callable_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "r.pt"
    torch.save(hm.build_raises().state_dict(), path)
    res = diag("hessian", path, "--model", "hfmodels:build_raises", "--data", "tinymodels:tiny_data")
    one_line_error(res, "hfmodels:build_raises", "tinymodels:tiny_data", "[23, 4]")


def test_forward_backend_on_lstm(tmp_path: Path) -> None:
    # was: "unexpected NotImplementedError" (mkldnn rnn has no forward AD)
    path = tmp_path / "lstm.pt"
    torch.save(hm.build_lstm().state_dict(), path)
    base = ["hessian", path, "--model", "hfmodels:build_lstm", "--data", "hfmodels:seq_batches"]
    one_line_error(diag(*base, "--backend", "forward"), "--backend reverse")
    res = diag(*base, "--backend", "auto", "-f", "json")
    assert records(res) and "double backward (--backend reverse) was used instead" in res.output
    ref = diag(*base, "--backend", "reverse", "-f", "json")
    assert records(res)[0]["value"] == pytest.approx(records(ref)[0]["value"], rel=1e-4)


# ------------------------------------------------------------------------------ wrapped state dicts
@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_compiled_and_ddp_state_dicts_load(tmp_path: Path, prefix: str) -> None:
    model = tm.build_tiny()
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    ctx = build_context(
        load_checkpoint(path), Binding(model="tinymodels:build_tiny", data="tinymodels:tiny_data"), dtype="float64"
    )
    X, y = tm.tiny_data()
    assert float(ctx.loss()) == pytest.approx(float(F.cross_entropy(model.double()(X.double()), y)), rel=1e-12)


def test_compiled_model_state_dict_loads(tmp_path: Path) -> None:
    model = tm.build_tiny()
    compiled = torch.compile(model)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    torch.save(compiled.state_dict(), tmp_path / "c.pt")
    ck = load_checkpoint(tmp_path / "c.pt")
    ctx = build_context(ck, Binding(model="tinymodels:build_tiny", data="tinymodels:tiny_data"), dtype="float64")
    assert set(ctx.params) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_folder_reading_hashes_what_it_reads(folder: Path) -> None:
    a = read_checkpoint_file(folder)
    assert set(a.files) == {"config.json", "model.safetensors"}
    (folder / "rng_state.pth").write_bytes(b"not read")
    assert read_checkpoint_file(folder).sha256 == a.sha256
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_norm_epsilon"] = 1e-6
    (folder / "config.json").write_text(json.dumps(cfg))
    assert read_checkpoint_file(folder).sha256 != a.sha256
    with pytest.raises(DiagnosticsError, match="model folder needs config.json"):
        read_checkpoint_file(folder.parent)


def test_a_config_json_naming_a_huge_model_is_refused_before_it_is_built(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diagnostics.hf

    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(n_embd=1024, n_layer=2)  # ~100 MB here, any size in a hostile folder; its weights hold kilobytes
    (folder / "config.json").write_text(json.dumps(cfg))
    built = []
    real = diagnostics.hf.build_from_config

    def recording(*args, **kwargs):
        built.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(diagnostics.hf, "build_from_config", recording)
    res = diag("hessian", folder, "--data", "hfmodels:gpt_batches")
    one_line_error(res, "does not fit the model", "missing", "transformer.h.1.")
    assert built == ["meta"]  # only the shapes were built: no weight was allocated or initialised


def test_a_model_folder_too_large_for_free_memory_is_one_line(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diagnostics.linalg.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    res = diag("hessian", folder, "--data", "hfmodels:gpt_batches")
    one_line_error(res, "not enough memory on cpu", "the model config.json of 'gpt' describes", "only 1000 B")


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("config.json", '{"model_type": "gpt2",', ["config.json' is not valid JSON (", "save the folder again"]),
        ("config.json", '{"a":' * 100_000 + "1" + "}" * 100_000, ["config.json' nests its JSON too deeply"]),
        ("trainer_state.json", "[" * 200_000 + "]" * 200_000, ["trainer_state.json' nests its JSON too deeply"]),
    ],
)
def test_unreadable_folder_json_says_why(folder: Path, name: str, text: str, words: list[str]) -> None:
    (folder / name).write_text(text)
    one_line_error(diag("hessian", folder, "--data", "hfmodels:gpt_batches"), *words)
