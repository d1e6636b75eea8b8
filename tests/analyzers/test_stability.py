"""BoS and prediction stability under feature dropout, against exact references.

The toy detectors' boxes are simple functions of one dropped feature per image, so the BoS of a pass
can be recomputed from the dropout masks (drawn again from the same generator) and its expectation over
masks is known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from diagnostics import boxes, features
from diagnostics.analyzers.registry import all_analyzers
from diagnostics.analyzers.stability import (
    BOX_FORMATS,
    INPUT_SUFFIX,
    BosConfig,
    StabilityConfig,
    analyze_bos,
    analyze_stability,
    correlate_bos,
    kl_divergence,
    summarize_passes,
)
from diagnostics.context import Context
from diagnostics.errors import DiagnosticsError
from diagnostics.spec import check_config


def make_ctx(model: nn.Module, batches: list, seed: int = 0) -> Context:
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    frozen = {n: b for n, b in model.named_buffers()}
    return Context(
        model=model,
        params=params,
        frozen=frozen,
        batches=batches,
        loss_fn=lambda o, t: o.sum(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        seed=seed,
        checkpoint="toy",
    )


class WidthDetector(nn.Module):
    """One box per image, ``[0, 0, 1 + f, 1]`` where ``f = feat(mean of the image)``; score 1."""

    def __init__(self, scale: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.w = nn.Parameter(torch.ones(()))
        self.scale, self.offset = scale, offset

    def forward(self, images):
        x = torch.stack(list(images)).mean((1, 2, 3))[:, None] * self.w  # [N, 1]
        f = self.feat(x)[:, 0]
        out = []
        for v in f:
            x1 = self.offset * v
            box = torch.stack([x1, torch.zeros(()), x1 + 1 + self.scale * v, torch.ones(())])
            out.append({"boxes": box[None], "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.long)})
        return out


def images(n: int, value: float = 1.0) -> list[torch.Tensor]:
    return [torch.full((3, 2, 2), value) for _ in range(n)]


def keep_masks(ctx: Context, k: int, shapes: list[tuple[int, ...]], p: float) -> list[torch.Tensor]:
    """The masks pass ``k`` draws: one ``rand >= p`` per hooked output, in forward order."""
    gen = ctx.generator(k)
    return [torch.rand(s, generator=gen) >= p for s in shapes]


# ----------------------------------------------------------------------------------------- BoS
def test_bos_matches_masks_exactly():
    p, n = 0.3, 40
    batches = [(images(25), None), (images(15), None)]
    ctx = make_ctx(WidthDetector(), batches)
    res = analyze_bos(BosConfig(modules=["feat"], p=p, passes=3), ctx)
    clean_w = 2.0
    for k, value in enumerate(res.metadata["bos"]["per_pass"]):
        masks = torch.cat(keep_masks(ctx, k, [(25, 1), (15, 1)], p))[:, 0]
        w = torch.where(masks, 1 + 1 / (1 - p), 1.0).double()
        iou = torch.minimum(w, torch.tensor(clean_w)) / torch.maximum(w, torch.tensor(clean_w))
        assert value == pytest.approx(float(iou.mean()), rel=1e-6)
    rec = {r.metric: r for r in res.records}
    assert set(rec) == {"bos", "bos_unmatched_fraction", "bos_skipped_images"}
    assert rec["bos"].value == pytest.approx(np.mean(res.metadata["bos"]["per_pass"]), abs=1e-15)
    assert rec["bos"].stderr == pytest.approx(np.std(res.metadata["bos"]["per_pass"], ddof=1) / math.sqrt(3))
    assert rec["bos_unmatched_fraction"].value == 0.0 and rec["bos_skipped_images"].value == 0.0
    assert res.metadata["images"] == n
    assert res.artifacts["per_image"].shape[0] == n * 3


def test_bos_converges_to_closed_form():
    # clean width 2; dropped -> width 1 (IoU 1/2), kept -> width 1 + 1/(1-p) (IoU 2(1-p)/(2-p))
    p, n, passes = 0.5, 500, 4
    ctx = make_ctx(WidthDetector(), [(images(n), None)], seed=7)
    res = analyze_bos(BosConfig(modules=["feat"], p=p, passes=passes), ctx)
    a, b = 0.5, 2 * (1 - p) / (2 - p)
    expected = p * a + (1 - p) * b
    sd = math.sqrt(p * (1 - p)) * abs(a - b) / math.sqrt(n * passes)
    assert abs(res.records[0].value - expected) < 4 * sd


def test_p_zero_gives_exactly_one_and_identity_detector():
    ctx = make_ctx(WidthDetector(), [(images(10), None)])
    res = analyze_bos(BosConfig(modules=["feat"], p=0.0, passes=2), ctx)
    rec = {r.metric: r.value for r in res.records}
    assert rec["bos"] == 1.0 and rec["bos_unmatched_fraction"] == 0.0


def test_disjoint_boxes_give_zero():
    # clean box at x = 10; dropout moves it to 0 or 20 (p = 0.5): never overlapping
    ctx = make_ctx(WidthDetector(scale=0.0, offset=10.0), [(images(8), None)])
    res = analyze_bos(BosConfig(modules=["feat"], p=0.5, passes=3), ctx)
    assert res.records[0].value == 0.0
    assert res.metadata["bos"]["per_pass"] == [0.0, 0.0, 0.0]


def test_seeds_reproduce_and_differ():
    def run(seed):
        ctx = make_ctx(WidthDetector(), [(images(30), None)], seed=seed)
        return analyze_bos(BosConfig(modules=["feat"], p=0.3, passes=4), ctx).metadata["bos"]["per_pass"]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_global_rng_untouched():
    state = torch.get_rng_state()
    ctx = make_ctx(WidthDetector(), [(images(5), None)])
    analyze_bos(BosConfig(modules=["feat"], p=0.3, passes=2), ctx)
    assert torch.equal(state, torch.get_rng_state())


def test_interval_shrinks_with_more_passes():
    ctx = make_ctx(WidthDetector(), [(images(12), None)], seed=3)

    def width(passes):
        s = analyze_bos(BosConfig(modules=["feat"], p=0.3, passes=passes), ctx).metadata["bos"]
        low, high = s["ci"]
        assert low <= s["mean"] <= high
        return high - low

    w5, w20, w80 = width(5), width(20), width(80)
    assert w5 > w20 > w80


def test_summarize_passes_t_interval():
    v = [0.8, 0.9, 0.85, 0.7]
    s = summarize_passes(v, 0.9)
    se = np.std(v, ddof=1) / 2
    half = stats.t.ppf(0.95, 3) * se
    assert s.stderr == pytest.approx(se, rel=1e-14)
    assert (s.low, s.high) == pytest.approx((np.mean(v) - half, np.mean(v) + half), rel=1e-14)
    one = summarize_passes([0.5])
    assert one.stderr is None and one.low is None


class ThresholdDetector(nn.Module):
    """Images with value v get one box scored v (no box when v == 0); dropout at feat scales v."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, images):
        v = self.feat(torch.stack(list(images)).amax((1, 2, 3)) * self.w)
        out = []
        for s in v:
            if s > 0:
                out.append({"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "scores": s[None]})
            else:
                out.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)})
        return out


def test_images_without_boxes_are_skipped_and_counted():
    imgs = images(3, 0.9) + images(2, 0.0)
    ctx = make_ctx(ThresholdDetector(), [(imgs, None)])
    res = analyze_bos(BosConfig(modules=["feat"], p=0.0, passes=2), ctx)
    rec = {r.metric: r.value for r in res.records}
    assert rec["bos"] == 1.0
    assert rec["bos_skipped_images"] == 2.0
    assert res.metadata["images_without_clean_boxes"] == 2
    assert any("skips 2 of 5 images" in n for n in res.metadata["notes"])


def test_no_detections_at_all_is_an_error():
    ctx = make_ctx(ThresholdDetector(), [(images(4, 0.3), None)])
    with pytest.raises(DiagnosticsError, match=r"no box with score >= 0.5 on any of the 4 images"):
        analyze_bos(BosConfig(modules=["feat"], p=0.1, passes=2), ctx)


def test_pass_that_loses_every_box_is_an_error_or_zero():
    # p = 0.99: the single image's feature is dropped (score 0 < threshold) in pass 0 with this seed
    ctx = make_ctx(ThresholdDetector(), [(images(1, 0.9), None)])
    assert not bool(keep_masks(ctx, 0, [(1,)], 0.99)[0].all())
    with pytest.raises(DiagnosticsError, match="dropout pass 0: no image has boxes in both"):
        analyze_bos(BosConfig(modules=["feat"], p=0.99, passes=1), ctx)
    res = analyze_bos(BosConfig(modules=["feat"], p=0.99, passes=1, empty="zero"), ctx)
    rec = {r.metric: r.value for r in res.records}
    assert rec["bos"] == 0.0 and rec["bos_unmatched_fraction"] == 1.0


def test_unknown_module_lists_candidates():
    ctx = make_ctx(WidthDetector(), [(images(2), None)])
    with pytest.raises(DiagnosticsError, match=r"no module 'fet'.*did you mean: feat"):
        analyze_bos(BosConfig(modules=["fet"]), ctx)


def test_module_that_never_runs_is_an_error():
    model = WidthDetector()
    model.unused = nn.Linear(1, 1)
    ctx = make_ctx(model, [(images(2), None)])
    with pytest.raises(DiagnosticsError, match="never ran"):
        analyze_bos(BosConfig(modules=["unused"], passes=1), ctx)


class Wrapped(nn.Module):
    """Output in a shape the analyzer does not know: ``(boxes [N, 4], scores [N])``."""

    def __init__(self, key: str = "bbox") -> None:
        super().__init__()
        self.inner = WidthDetector()
        self.key = key

    def forward(self, images):
        dets = self.inner(images)
        if self.key == "tuple":
            return torch.cat([d["boxes"] for d in dets]), torch.cat([d["scores"] for d in dets])
        return [{self.key: d["boxes"], "scores": d["scores"]} for d in dets]


def tuple_adapter(output):
    boxes, scores = output
    return [{"boxes": b[None], "scores": s[None]} for b, s in zip(boxes, scores)]


def test_output_without_boxes_is_an_error_and_adapter_fixes_it():
    ctx = make_ctx(Wrapped("bbox"), [(images(3), None)])
    with pytest.raises(DiagnosticsError, match=r"has no 'boxes'.*--adapter"):
        analyze_bos(BosConfig(modules=["inner.feat"]), ctx)
    ctx = make_ctx(Wrapped("tuple"), [(images(3), None)])
    with pytest.raises(DiagnosticsError, match="not a list of per-image dicts"):
        analyze_bos(BosConfig(modules=["inner.feat"]), ctx)
    adapted = analyze_bos(BosConfig(modules=["inner.feat"], p=0.3, passes=2, adapter_fn=tuple_adapter), ctx)
    direct = analyze_bos(BosConfig(modules=["feat"], p=0.3, passes=2), make_ctx(WidthDetector(), [(images(3), None)]))
    assert adapted.metadata["bos"]["per_pass"] == direct.metadata["bos"]["per_pass"]


def test_batched_tensor_input_and_batchnorm_stays_in_eval():
    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.body[1].running_mean.uniform_(-0.5, 0.5)

        def forward(self, x):
            f = self.body(torch.stack(list(x)) if isinstance(x, list) else x).mean((2, 3))  # [N, 4]
            return [{"boxes": torch.stack([r[0], r[1], r[0] + 2 + r[2].abs(), r[1] + 2 + r[3].abs()])[None]} for r in f]

    det = Det()
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    before = det.body[1].running_mean.clone()
    res_t = analyze_bos(BosConfig(modules=["body.0"], p=0.2, passes=2), make_ctx(det, [(x, None)]))
    res_l = analyze_bos(BosConfig(modules=["body.0"], p=0.2, passes=2), make_ctx(det, [(list(x), None)]))
    assert not det.training and not det.body[1].training
    assert torch.equal(before, det.body[1].running_mean)
    assert res_t.metadata["bos"]["per_pass"] == res_l.metadata["bos"]["per_pass"]
    assert 0.0 < res_t.records[0].value < 1.0
    assert any("no 'scores'" in n for n in res_t.metadata["notes"])


def test_bos_registered():
    specs = all_analyzers()
    assert specs["bos"].needs_targets is False and specs["stability"].needs_targets is False
    assert specs["bos"].make_config({"modules": ["a"], "p": 0.2}).p == 0.2
    with pytest.raises(DiagnosticsError, match=r"bos.p must be in \[0, 1\), got 1.0"):
        specs["bos"].make_config({"modules": ["a"], "p": 1.0})
    with pytest.raises(DiagnosticsError, match=r"unknown option 'module' in \[bos\]; did you mean 'modules'\?"):
        specs["bos"].make_config({"module": "a"})
    assert specs["stability"].make_config({"modules": "a,b"}).modules == ["a", "b"]
    assert specs["bos"].make_config({}).modules == []  # empty: the input of the last nn.Linear
    with pytest.raises(DiagnosticsError, match="at least one module.*the input of the last nn.Linear, does not exist"):
        analyze_bos(BosConfig(), make_ctx(WidthDetector(), [(images(2), None)]))
    with pytest.raises(DiagnosticsError, match="--score-threshold must be a finite number"):
        check_config(BosConfig(modules=["a"], score_threshold=float("inf")))
    with pytest.raises(DiagnosticsError, match="give the adapter once"):
        check_config(BosConfig(modules=["a"], adapter="m:f", adapter_fn=tuple_adapter))
    assert BOX_FORMATS == boxes.BOX_FORMATS  # the declaration's copies, kept without importing torch
    assert INPUT_SUFFIX == features.INPUT_SUFFIX


def test_every_metric_is_declared_and_the_interval_is_a_note():
    declared = {a: {m.name for m in all_analyzers()[a].metrics} for a in ("bos", "stability")}
    assert declared == {
        "bos": {"bos", "bos_unmatched_fraction", "bos_skipped_images"},
        "stability": {"prediction_agreement", "prediction_kl"},
    }
    ctx = make_ctx(WidthDetector(), [(images(4, 0.5) + images(4, 2.0), None)])
    res = analyze_bos(BosConfig(modules=["feat"], p=0.3, passes=4, label="set_a"), ctx)
    assert {r.metric for r in res.records} == declared["bos"]
    low, high = res.metadata["bos"]["ci"]
    line = f"bos = {res.records[0].value:.4f}, 95% t-interval over 4 passes [{low:.4f}, {high:.4f}]"
    assert line in res.metadata["notes"] and res.metadata["label"] == "set_a"
    assert not any("t-interval" in n for n in analyze_bos(BosConfig(modules=["feat"], passes=1), ctx).metadata["notes"])
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    clf = make_ctx(LinearClassifier().double(), [(x, None)])
    st = analyze_stability(StabilityConfig(modules=["features"], p=0.3, passes=3, confidence=0.9), clf)
    assert {r.metric for r in st.records} == declared["stability"]
    assert sum("90% t-interval over 3 passes" in n for n in st.metadata["notes"]) == 2


# ---------------------------------------------------------------------------- prediction stability
class LinearClassifier(nn.Module):
    def __init__(self, d: int = 6, c: int = 4, binary: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = nn.Identity()
        self.head = nn.Linear(d, 1 if binary else c)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.features(x))


def test_kl_divergence_matches_scipy():
    p = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], dtype=torch.float64)
    kl = kl_divergence(p.log(), q.log())
    np.testing.assert_allclose(kl.numpy(), [stats.entropy(p[i], q[i]) for i in range(2)], rtol=1e-14)


@pytest.mark.parametrize("binary", [False, True])
def test_prediction_stability_matches_masks_exactly(binary):
    p, n = 0.4, 50
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(2))
    model = LinearClassifier(binary=binary)
    ctx = make_ctx(model, [(x[:30], None), (x[30:], None)])
    res = analyze_stability(StabilityConfig(modules=["features"], p=p, passes=3), ctx)
    with torch.no_grad():
        clean = model(x).double()
    for k in range(3):
        masks = torch.cat(keep_masks(ctx, k, [(30, 6), (20, 6)], p))
        with torch.no_grad():
            drop = model.head(x * masks / (1 - p)).double()
        if binary:
            clean2 = torch.cat([-clean, clean], 1) / 2
            drop2 = torch.cat([-drop, drop], 1) / 2  # softmax([-z/2, z/2]) = [1 - sigmoid(z), sigmoid(z)]
        else:
            clean2, drop2 = clean, drop
        lp, lq = torch.log_softmax(clean2, 1), torch.log_softmax(drop2, 1)
        agree = float((lp.argmax(1) == lq.argmax(1)).double().mean())
        kl = float((lp.exp() * (lp - lq)).sum(1).mean())
        assert res.metadata["prediction_agreement"]["per_pass"][k] == pytest.approx(agree, abs=1e-15)
        assert res.metadata["prediction_kl"]["per_pass"][k] == pytest.approx(kl, rel=1e-6)
    assert [r.metric for r in res.records] == ["prediction_agreement", "prediction_kl"]


def test_default_site_is_the_input_of_the_last_linear():
    """``head:input`` (a pre-hook on the head) and ``features`` (the Identity feeding it) drop the same tensor
    with the same masks, so the passes agree exactly; the default is ``head:input``."""
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ctx = make_ctx(LinearClassifier().double(), [(x[:20], None), (x[20:], None)])
    by_output = analyze_stability(StabilityConfig(modules=["features"], p=0.3, passes=3), ctx)
    for modules in ([], ["head:input"]):
        res = analyze_stability(StabilityConfig(modules=modules, p=0.3, passes=3), ctx)
        assert res.metadata["modules"] == ["head:input"]
        for metric in ("prediction_agreement", "prediction_kl"):
            assert res.metadata[metric]["per_pass"] == by_output.metadata[metric]["per_pass"]
    assert 0.0 < by_output.records[0].value < 1.0
    with pytest.raises(DiagnosticsError, match="no module 'haed'.*did you mean: head"):
        analyze_stability(StabilityConfig(modules=["haed:input"]), ctx)


def test_prediction_stability_p_zero_and_probs():
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    res = analyze_stability(
        StabilityConfig(modules=["features"], p=0.0, passes=2), make_ctx(LinearClassifier().double(), [(x, None)])
    )
    assert {r.metric: r.value for r in res.records} == {"prediction_agreement": 1.0, "prediction_kl": 0.0}

    class Probs(LinearClassifier):
        def forward(self, x):
            return torch.softmax(super().forward(x), 1)

    a = analyze_stability(
        StabilityConfig(modules=["features"], p=0.3, passes=2), make_ctx(LinearClassifier().double(), [(x, None)])
    )
    b = analyze_stability(
        StabilityConfig(modules=["features"], p=0.3, passes=2, output_type="probs"),
        make_ctx(Probs().double(), [(x, None)]),
    )
    assert a.records[0].value == b.records[0].value
    assert a.records[1].value == pytest.approx(b.records[1].value, rel=1e-12)


def test_prediction_stability_bad_output():
    class Boxes(LinearClassifier):
        def forward(self, x):
            return [{"boxes": super().forward(x)}]

    x = torch.randn(4, 6)
    with pytest.raises(DiagnosticsError, match=r"needs a \[N, C\] tensor"):
        analyze_stability(StabilityConfig(modules=["features"]), make_ctx(Boxes(), [(x, None)]))


# -------------------------------------------------------------------------------- correlation
def test_correlate_bos_against_numpy():
    x = np.array([0.9, 0.85, 0.8, 0.7, 0.6])
    y = np.array([0.8, 0.78, 0.6, 0.55, 0.3])
    res = correlate_bos(list("abcde"), x, y)
    rec = {(r.metric, r.group): r for r in res.records}
    assert rec[("pearson_r", None)].value == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    ranks = stats.rankdata
    assert rec[("spearman_rho", None)].value == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], rel=1e-12)
    slope, intercept = np.polyfit(x, y, 1)
    assert rec[("fit_slope", None)].value == pytest.approx(slope, rel=1e-10)
    assert rec[("fit_intercept", None)].value == pytest.approx(intercept, rel=1e-10)
    preds = []
    for i in range(5):
        keep = np.arange(5) != i
        s, c = np.polyfit(x[keep], y[keep], 1)
        preds.append(s * x[i] + c)
        assert rec[("loo_predicted_map", "abcde"[i])].value == pytest.approx(preds[-1], rel=1e-10)
    assert rec[("loo_rmse", None)].value == pytest.approx(np.sqrt(np.mean((np.array(preds) - y) ** 2)), rel=1e-10)


def test_correlate_bos_perfect_line_and_errors():
    x = np.array([0.5, 0.6, 0.7, 0.8])
    res = correlate_bos(["a", "b", "c", "d"], x, 2 * x - 0.6)
    rec = {r.metric: r.value for r in res.records if r.group is None}
    assert rec["pearson_r"] == pytest.approx(1.0, abs=1e-12) and rec["spearman_rho"] == pytest.approx(1.0)
    assert rec["loo_rmse"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(DiagnosticsError, match="at least 3"):
        correlate_bos(["a", "b"], [0.5, 0.6], [0.1, 0.2])
    with pytest.raises(DiagnosticsError, match="all BoS values are equal"):
        correlate_bos(["a", "b", "c"], [0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    with pytest.raises(DiagnosticsError, match="leaving out 'c'"):
        correlate_bos(["a", "b", "c"], [0.5, 0.5, 0.6], [0.1, 0.2, 0.3])
    with pytest.raises(DiagnosticsError, match="unique"):
        correlate_bos(["a", "a", "c"], [0.5, 0.4, 0.6], [0.1, 0.2, 0.3])


def test_parse_detections_other_layouts_and_formats():
    from types import SimpleNamespace

    from diagnostics.analyzers.stability import parse_detections, select_boxes

    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(0, 4)]
    dict_of_lists = {"boxes": boxes, "scores": [torch.tensor([0.7]), torch.zeros(0)]}
    dets = parse_detections(dict_of_lists, 2, "xywh")
    assert torch.equal(dets[0]["boxes"], torch.tensor([[1.0, 2.0, 4.0, 6.0]], dtype=torch.float64))
    assert dets[1]["boxes"].shape == (0, 4) and dets[0]["labels"] is None
    inst = SimpleNamespace(
        pred_boxes=SimpleNamespace(tensor=torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 5.0, 5.0]])),
        scores=torch.tensor([0.4, 0.9]),
        pred_classes=torch.tensor([3, 1]),
    )
    (d,) = parse_detections([{"instances": inst}], 1)
    kept = select_boxes(d, score_threshold=0.3, max_boxes=1)
    assert kept["boxes"].tolist() == [[1.0, 1.0, 5.0, 5.0]] and kept["labels"].tolist() == [1]
    with pytest.raises(DiagnosticsError, match="non-finite"):
        parse_detections([{"boxes": torch.tensor([[0.0, 0.0, float("nan"), 1.0]])}], 1)
    with pytest.raises(DiagnosticsError, match="one entry per box"):
        parse_detections([{"boxes": torch.zeros(2, 4), "scores": torch.zeros(3)}], 1)
    with pytest.raises(DiagnosticsError, match="2 detection sets for 3 images"):
        parse_detections([{"boxes": torch.zeros(0, 4)}] * 2, 3)


def test_dropout_reaches_every_tensor_of_a_dict_output():
    class Multi(nn.Module):
        def forward(self, x):
            return {"a": x, "b": (x, torch.ones(2, dtype=torch.long))}

    from diagnostics.analyzers.stability import feature_dropout

    m = Multi()
    with feature_dropout({"m": m}, 0.5, torch.Generator().manual_seed(0)) as calls:
        out = m(torch.ones(1000))
    assert calls == {"m": 1}
    for t in (out["a"], out["b"][0]):
        assert set(t.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(out["a"], out["b"][0])  # independent masks
    assert torch.equal(out["b"][1], torch.ones(2, dtype=torch.long))  # integers untouched
    assert torch.equal(m(torch.ones(3))["a"], torch.ones(3))  # hooks removed on exit


def test_prediction_stability_on_dict_batches_and_output_objects_equals_the_hand_computation():
    """transformers layout: each batch's dict of inputs is passed as keyword arguments, and the logits are read
    from an output object carrying ``.loss`` and ``.logits``; the default site is the classifier's input."""
    import kwmodels as kw

    batches = kw.cls_batches()
    model = kw.build_classifier().double()
    ctx = make_ctx(model, [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches])
    res = analyze_stability(StabilityConfig(p=0.3, passes=4), ctx)
    agree, kl = kw.stability_by_hand(kw.classifier_features(model), model.classifier, batches, 0.3, 4, ctx.seed)
    assert res.metadata["modules"] == ["classifier:input"] and res.metadata["samples"] == 32
    assert res.metadata["prediction_agreement"]["per_pass"] == pytest.approx(agree, abs=1e-15)
    assert res.metadata["prediction_kl"]["per_pass"] == pytest.approx(kl, rel=1e-10)
    assert 0 < min(agree) < 1 and min(kl) > 0


def test_map_table_errors_name_the_rows_and_the_column(tmp_path) -> None:
    from diagnostics.analyzers.stability import read_map_table

    table = tmp_path / "maps.csv"
    table.write_text("set,map\na,0.9\nb,0.7\nc,0.4\n")
    assert read_map_table(table) == {"a": 0.9, "b": 0.7, "c": 0.4}
    with pytest.raises(DiagnosticsError) as err:  # the set names taken for the mAP column
        read_map_table(table, "set")
    msg = str(err.value)
    assert "column 'set' holds no numbers ('a', 'b', 'c')" in msg and "--map-column" in msg and "set, map" in msg
    table.write_text("set,map\na,0.9\nb,n/a\nc\n")  # a bad value and a short row
    with pytest.raises(DiagnosticsError) as err:
        read_map_table(table)
    assert "column 'map' is not a number for b: 'n/a', c: empty; fix those rows" in str(err.value)


def test_map_table_that_is_a_folder_is_named_as_such(tmp_path) -> None:
    from diagnostics.analyzers.stability import read_map_table

    with pytest.raises(DiagnosticsError, match="is a folder, not a mAP table; pass a CSV of test sets"):
        read_map_table(tmp_path)
