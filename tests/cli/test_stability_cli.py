"""``diag bos``, ``diag bos-correlate`` and ``diag stability`` through Typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import kwmodels as kw
import pandas as pd
import pytest
from typer.testing import CliRunner

from diag_cli.main import app
from diagnostics.analyzers.registry import all_analyzers
from diagnostics.analyzers.stability import correlate_bos
from diagnostics.binding import import_callable
from diagnostics.checkpoint import save_checkpoint
from diagnostics.results import read_result
from diagnostics.spec import params_of

TOY = '''
import torch
from torch import nn


class Det(nn.Module):
    """Two boxes per image from pooled 1x1-conv features; torchvision-style output."""

    def __init__(self, key="boxes", score=0.9):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.key, self.score = key, score

    def forward(self, images):
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        f = self.backbone(x).mean((2, 3))
        out = []
        for r in f:
            b0 = torch.stack([r[0], r[1], r[0] + 4 + r[2].abs(), r[1] + 4 + r[3].abs()])
            boxes = torch.stack([b0, b0 + 10])
            out.append({self.key: boxes, "scores": torch.tensor([self.score, self.score - 0.1]),
                        "labels": torch.ones(2, dtype=torch.long)})
        return out


def build():
    return Det()


def build_nobox():
    return Det(key="bbox")


def build_dim():
    return Det(score=0.3)


def _images(n, seed, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 6, 6, generator=g) + noise * torch.randn(3, 6, 6, generator=g) for _ in range(n)]


def two_images():
    return _images(2, 0)


def images_with_targets():
    imgs = _images(6, 1)
    return imgs, [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.long)} for _ in imgs]


def set_a():
    return _images(8, 2, 0.0)


def set_b():
    return _images(8, 3, 1.0)


def set_c():
    return _images(8, 4, 3.0)


class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x))


def clf_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
'''

runner = CliRunner()


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    (tmp_path / "toydet.py").write_text(TOY)
    det = import_callable(f"{tmp_path / 'toydet.py'}:build")()
    save_checkpoint(tmp_path / "det.pt", det)
    clf = import_callable(f"{tmp_path / 'toydet.py'}:Clf")()
    save_checkpoint(tmp_path / "clf.pt", clf)
    return tmp_path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def records(output: str) -> dict[str, dict]:
    return {r["metric"]: r for r in json.loads(output)}


def bos_args(data: str = "two_images", *extra: str) -> list[str]:
    return [
        "bos",
        "det.pt",
        "--model",
        "toydet.py:build",
        "--data",
        f"toydet.py:{data}",
        "--module",
        "backbone.0",
        *extra,
    ]


def test_bos_json_and_outputs(toy: Path):
    res = invoke(*bos_args("two_images", "--p", "0.3", "--passes", "4", "-f", "json", "--out", "r.json"))
    assert res.exit_code == 0, res.output
    rec = records(res.stdout)
    assert set(rec) == {"bos", "bos_unmatched_fraction", "bos_skipped_images"}
    assert 0.0 < rec["bos"]["value"] < 1.0 and rec["bos"]["stderr"] > 0
    saved = read_result(toy / "r.json")
    assert saved.metadata["images"] == 2  # a list of two images is two images, not (inputs, targets)
    assert saved.metadata["bos"]["ci"][0] < rec["bos"]["value"] < saved.metadata["bos"]["ci"][1]
    assert "95% t-interval over 4 passes" in res.stderr
    # same seed, same numbers; refuses to overwrite without --force
    again = invoke(*bos_args("two_images", "--p", "0.3", "--passes", "4", "-f", "json", "--out", "r.json"))
    assert again.exit_code == 2 and "--force" in again.stderr
    again = invoke(*bos_args("two_images", "--p", "0.3", "--passes", "4", "-f", "json", "--out", "r.json", "--force"))
    assert again.exit_code == 0 and records(again.stdout) == rec


def test_bos_p_zero_table_and_per_image(toy: Path):
    res = invoke(*bos_args("images_with_targets", "--p", "0", "--per-image", "img.csv", "--passes", "2"))
    assert res.exit_code == 0, res.output
    assert "bos_unmatched_fraction" in res.stdout
    df = pd.read_csv(toy / "img.csv")
    assert len(df) == 6 * 2 and (df["score"] == 1.0).all()
    res = invoke(*bos_args("images_with_targets", "--per-image", "img.csv"))
    assert res.exit_code == 2 and "'img.csv' exists" in res.stderr


def test_bos_bad_input_exits_2_with_one_line(toy: Path):
    res = invoke(*bos_args("two_images")[:-1], "backbone.9")
    assert res.exit_code == 2
    assert "no module 'backbone.9'" in res.stderr and "backbone.0" in res.stderr
    assert "Traceback" not in res.output

    res = invoke(
        "bos", "det.pt", "--model", "toydet.py:build_nobox", "--data", "toydet.py:two_images", "-m", "backbone"
    )
    assert res.exit_code == 2 and "has no 'boxes'" in res.stderr and "--adapter" in res.stderr

    res = invoke("bos", "det.pt", "--model", "toydet.py:build_dim", "--data", "toydet.py:two_images", "-m", "backbone")
    assert res.exit_code == 2 and "no box with score >= 0.5 on any of the 2 images" in res.stderr
    res = invoke(
        "bos", "det.pt", "--model", "toydet.py:build_dim", "--data", "toydet.py:two_images", "-m", "backbone",
        "--score-threshold", "0.25", "-f", "json",
    )  # fmt: skip
    assert res.exit_code == 0 and records(res.stdout)["bos_skipped_images"]["value"] == 0.0

    for flag, value, msg in [("--p", "1.5", "--p must be in"), ("--passes", "0", "--passes must be"),
                             ("--box-format", "yolo", "--box-format"), ("--empty", "drop", "--empty")]:  # fmt: skip
        res = invoke(*bos_args("two_images", flag, value))
        assert res.exit_code == 2 and msg in res.stderr, (flag, res.stderr)
    res = invoke("bos", "det.pt", "--model", "toydet.py:build", "--data", "toydet.py:two_images")
    assert res.exit_code == 2 and "--module" in res.stderr


def test_bos_modules_from_diag_toml(toy: Path):
    (toy / "diag.toml").write_text(
        'model = "toydet.py:build"\ndata = "toydet.py:set_a"\n[bos]\nmodules = ["backbone.1"]\np = 0.2\npasses = 3\n'
    )
    res = invoke("bos", "det.pt", "-f", "json", "--out", "r.json")
    assert res.exit_code == 0, res.output
    meta = read_result(toy / "r.json").metadata
    assert meta["config"]["modules"] == ["backbone.1"] and meta["config"]["p"] == 0.2
    assert meta["config"]["passes"] == 3 and len(meta["bos"]["per_pass"]) == 3
    # the old singular key is not a second name: one name per option
    (toy / "diag.toml").write_text(
        'model = "toydet.py:build"\ndata = "toydet.py:set_a"\n[bos]\nmodule = "backbone.1"\n'
    )
    res = invoke("bos", "det.pt")
    assert res.exit_code == 2 and "unknown option 'module' in [bos]; did you mean 'modules'?" in res.stderr


def test_bos_correlate_end_to_end(toy: Path):
    for name in ("set_a", "set_b", "set_c"):
        res = invoke(*bos_args(name, "--p", "0.3", "--passes", "3", "--label", name, "--out", f"{name}_bos.json"))
        assert res.exit_code == 0, res.output
    # a fourth set written by hand under its file stem
    bos_d = read_result(toy / "set_a_bos.json")
    (toy / "set_d.json").write_text(
        json.dumps({"metadata": {}, "records": [{**bos_d.records[0].to_dict(), "value": 0.5, "stderr": 0.01}]})
    )
    maps = {"set_a": 0.9, "set_b": 0.7, "set_c": 0.4, "set_d": 0.3}
    pd.DataFrame({"set": list(maps), "mAP": list(maps.values())}).to_csv(toy / "maps.csv", index=False)
    files = ["set_a_bos.json", "set_b_bos.json", "set_c_bos.json", "set_d.json"]
    res = invoke("bos-correlate", *files, "--map", "maps.csv", "-f", "json", "--plot", "fit.png")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    bos = [read_result(toy / f).records[0].value for f in files]
    expected = correlate_bos(list(maps), bos, list(maps.values()))
    got = {(r["metric"], r["group"]): r["value"] for r in out}
    for r in expected.records:
        assert got[(r.metric, r.group)] == pytest.approx(r.value, rel=1e-12)
    assert (toy / "fit.png").read_bytes()[:4] == b"\x89PNG"
    res = invoke("bos-correlate", *files, "--map", "maps.csv", "--plot", "fit.png")
    assert res.exit_code == 2 and "--force" in res.stderr

    res = invoke("bos-correlate", *files[:3], "stray.json", "--map", "maps.csv")
    assert res.exit_code == 2 and "no such results file" in res.stderr
    pd.DataFrame({"set": ["set_a", "set_b"], "map": [0.9, 0.7]}).to_csv(toy / "few.csv", index=False)
    res = invoke("bos-correlate", *files, "--map", "few.csv")
    assert res.exit_code == 2 and "not listed in 'few.csv'" in res.stderr
    res = invoke("bos-correlate", *files[:2], "--map", "maps.csv")
    assert res.exit_code == 2 and "at least 3" in res.stderr
    res = invoke("bos-correlate", *files, "--map", "maps.csv", "--metric", "prediction_kl")
    assert res.exit_code == 2 and "holds no 'prediction_kl' record" in res.stderr


def test_stability_cli(toy: Path):
    base = ["stability", "clf.pt", "--model", "toydet.py:Clf", "--data", "toydet.py:clf_data", "--module", "features"]
    res = invoke(*base, "--p", "0.3", "--passes", "3", "-f", "json")
    assert res.exit_code == 0, res.output
    rec = records(res.stdout)
    assert 0.0 < rec["prediction_agreement"]["value"] < 1.0 and rec["prediction_kl"]["value"] > 0
    res = invoke(*base, "--p", "0", "-f", "json")
    rec = records(res.stdout)
    assert rec["prediction_agreement"]["value"] == 1.0 and rec["prediction_kl"]["value"] == 0.0
    res = invoke(*base[:-1], "head.weight")
    assert res.exit_code == 2 and "no module 'head.weight'" in res.stderr
    res = invoke(*base, "--output-type", "softmax")
    assert res.exit_code == 2 and "--output-type" in res.stderr


@pytest.mark.parametrize("name", ["bos", "stability"])
def test_help_shows_the_declared_options(name):
    res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for p in (p for p in params_of(all_analyzers()[name].config) if p.info.cli):
        assert p.flag in res.stdout and all(a in res.stdout for a in p.info.aliases), p.flag
    assert "--module" in res.stdout and "-m" in res.stdout and "-p" in res.stdout
    assert ("--per-image" in res.stdout) == (name == "bos")


def test_bos_correlate_help_shows_its_options():
    res = runner.invoke(app, ["bos-correlate", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for flag in ("--map", "--map-column", "--metric", "--plot", "--format", "--out", "--force", "--quiet"):
        assert flag in res.stdout, flag


@pytest.mark.parametrize(
    ("name", "key", "known"), [("bos", "passs", "passes"), ("stability", "output_typ", "output_type")]
)
def test_unknown_key_in_the_analyzer_table_exits_2_with_did_you_mean(toy: Path, name, key, known):
    (toy / "diag.toml").write_text(f"[{name}]\n{key} = 3\n")
    res = invoke(name, "det.pt", "--module", "backbone.0")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"unknown option '{key}' in [{name}]; did you mean '{known}'?" in res.stderr


def test_bos_correlate_bad_options(toy: Path):
    res = invoke("bos-correlate", "a.json", "b.json", "c.json")
    assert res.exit_code == 2 and "--map is required" in res.stderr
    res = invoke("bos-correlate", "a.json", "--map", "maps.csv", "--plot", "fit.jpg")
    assert res.exit_code == 2 and "--plot 'fit.jpg': use a .png file" in res.stderr
    res = invoke("bos-correlate", "a.json", "--map", "maps.csv", "-f", "xml")
    assert res.exit_code == 2 and "--format must be one of table, json, csv, md" in res.stderr


@pytest.mark.parametrize(
    "module",
    [
        "diagnostics.analyzers.collapse",
        "diagnostics.analyzers.weights",
        "diagnostics.analyzers.stability",
        "diag_cli.commands.bos_correlate",
    ],
)
def test_modules_import_without_the_numerical_stack(module):
    import subprocess
    import sys

    code = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        "print([m for m in ('torch', 'pandas', 'numpy', 'scipy', 'matplotlib', 'pyarrow') if m in sys.modules])"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code, module], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------- transformers layout: dict batches, outputs with .logits


def check_stability(res, features, head, batches) -> None:
    assert res.exit_code == 0, res.output
    rec = records(res.stdout)
    agree, kl = kw.stability_by_hand(features, head, batches, 0.3, 3)
    assert rec["prediction_agreement"]["value"] == pytest.approx(sum(agree) / 3, abs=1e-15)
    assert rec["prediction_kl"]["value"] == pytest.approx(sum(kl) / 3, rel=1e-9)
    assert min(kl) > 0


def test_stability_cli_on_dict_batches(tmp_path: Path):
    from diagnostics.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "kw.pt", kw.build_classifier())
    args = ["--model", kw.spec("build_classifier"), "--data", kw.spec("cls_batches"), "--dtype", "float64"]
    res = invoke("stability", "kw.pt", *args, "--p", "0.3", "--passes", "3", "-f", "json")
    model = kw.build_classifier().double().eval()
    check_stability(res, kw.classifier_features(model), model.classifier, kw.cls_batches())


def test_stability_cli_on_a_save_pretrained_bert_folder(tmp_path: Path):
    pytest.importorskip("transformers")
    model = kw.build_bert()
    model.save_pretrained(tmp_path / "bert")
    args = ["--data", kw.spec("cls_batches"), "--dtype", "float64", "--p", "0.3", "--passes", "3", "-f", "json"]
    res = invoke("stability", "bert", *args)
    model = model.double()
    check_stability(res, kw.bert_features(model), model.classifier, kw.cls_batches())
