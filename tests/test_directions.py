"""PointEvaluator with the context's loss semantics: dict batches passed as keyword arguments, the
model's own loss (``--loss model``), model outputs with ``.logits`` and token-weighted losses.

Every expected number is written out by hand in float64 from the parameters (no diag code on the way):
the evaluator must give the full-data loss (the mean over samples, or over counted targets for a
token-level loss) and the accuracy of the logits, with both backends, at the centre and away from it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.binding import resolve_loss
from diagnostics.context import Context
from diagnostics.directions import FlatSpace, PointEvaluator

F64 = torch.float64
VOCAB, CLASSES = 7, 3


# ------------------------------------------------------------------------------------ fixtures
def wrap(kind: str, loss: torch.Tensor | None, logits: torch.Tensor):
    """The outputs as a dict or as a transformers ``ModelOutput`` (attributes ``.loss`` and ``.logits``)."""
    if kind == "dict":
        return {"loss": loss, "logits": logits}
    from transformers.modeling_outputs import SequenceClassifierOutput

    return SequenceClassifierOutput(loss=loss, logits=logits)


class KwargClassifier(nn.Module):
    """HF-style: ``forward(input_ids, attention_mask, labels=None)``; logits from the masked mean of token
    embeddings (optionally batch-normalised), the loss (cross-entropy) only when given labels."""

    def __init__(self, output: str = "dict", token_level: bool = False, batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.output, self.token_level = output, token_level
        self.emb = nn.Embedding(VOCAB, 4)
        self.norm = nn.BatchNorm1d(4) if batchnorm else None
        self.head = nn.Linear(4, CLASSES)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ):
        h = self.emb(input_ids)  # [B, T, 4]
        if self.token_level:
            logits = self.head(h)  # [B, T, C]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1)
            logits = self.head(pooled if self.norm is None else self.norm(pooled))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, CLASSES), labels.reshape(-1), ignore_index=-100)
        return wrap(self.output, loss, logits)


def dict_batches(token_level: bool = False) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Two ragged ``({input_ids, attention_mask}, labels)`` batches of 4 and 3 sequences of width 5.

    Token-level labels ``[B, 5]`` are -100 on padding: the batches hold 14 and 4 counted targets, so the
    token mean differs from the mean of the batch means.
    """
    g = torch.Generator().manual_seed(5)
    out = []
    for lengths in ((5, 4, 3, 2), (2, 1, 1)):
        n = len(lengths)
        ids = torch.randint(1, VOCAB, (n, 5), generator=g)
        mask = (torch.arange(5).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
        if token_level:
            labels = torch.randint(0, CLASSES, (n, 5), generator=g).masked_fill(mask == 0, -100)
        else:
            labels = torch.randint(0, CLASSES, (n,), generator=g)
        out.append(({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}, labels))
    return out


def dict_context(model: nn.Module, batches, loss: str, token_weighted: bool = False) -> Context:
    """A float64 context as :func:`diagnostics.context.build_context` makes it for dict batches."""
    model = model.double().eval()
    loss_fn, loss_name = resolve_loss(loss)
    return Context(
        model=model,
        params={n: p.detach() for n, p in model.named_parameters()},
        frozen={n: b.detach() for n, b in model.named_buffers()},
        batches=batches,
        loss_fn=loss_fn,
        device=torch.device("cpu"),
        dtype=F64,
        loss_name=loss_name,
        label_key="labels",
        token_weighted=token_weighted,
    )


def points(ctx: Context) -> torch.Tensor:
    """``[2, dim]``: the centre and a seeded shifted point."""
    space = FlatSpace.of(ctx.params)
    w = space.flatten(ctx.params)
    d = torch.randn(space.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    return torch.stack([w, w + 0.5 * d])


def logits_by_hand(params: dict[str, torch.Tensor], x: dict[str, torch.Tensor], token_level: bool) -> torch.Tensor:
    """:class:`KwargClassifier` (without BatchNorm) written out from its parameters."""
    h = params["emb.weight"][x["input_ids"]]
    if not token_level:
        m = x["attention_mask"].unsqueeze(-1).to(F64)
        h = (h * m).sum(1) / m.sum(1)
    return h @ params["head.weight"].T + params["head.bias"]


# ------------------------------------------------------------------------------ dict batches
@pytest.mark.parametrize("backend", ["vmap", "loop"])
@pytest.mark.parametrize("loss", ["model", "cross_entropy"])
@pytest.mark.parametrize("output", ["dict", "ModelOutput"])
def test_dict_batches_give_the_sample_mean_loss_and_accuracy(output: str, loss: str, backend: str) -> None:
    if output == "ModelOutput":
        pytest.importorskip("transformers")
    batches = dict_batches()
    ctx = dict_context(KwargClassifier(output), batches, loss)
    ev = PointEvaluator(ctx, chunk=2, backend=backend)
    P = points(ctx)
    stats = ev.evaluate(P, predictions=True)
    assert ev.backend == backend and ev.kind == "argmax"
    space = FlatSpace.of(ctx.params)
    y = torch.cat([b[1] for b in batches])
    for k in range(P.shape[0]):
        params = space.unflatten(P[k])
        logits = torch.cat([logits_by_hand(params, x, token_level=False) for x, _ in batches])
        assert float(stats.loss[k]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-12)
        assert float(stats.accuracy[k]) == pytest.approx(float((logits.argmax(1) == y).double().mean()), rel=1e-15)
        assert torch.equal(stats.predictions[k], logits.argmax(1))
    assert stats.loss[0] != stats.loss[1]


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_accuracy_leaves_out_ignored_labels(backend: str) -> None:
    """A -100 label (cross-entropy's ignore_index) is not a sample to score: accuracy is over the others."""
    batches = dict_batches()
    batches[0][1][1] = -100
    batches[1][1][0] = -100
    ctx = dict_context(KwargClassifier(), batches, "cross_entropy")
    stats = PointEvaluator(ctx, backend=backend).evaluate(points(ctx))
    space = FlatSpace.of(ctx.params)
    y = torch.cat([b[1] for b in batches])
    for k in range(2):
        logits = torch.cat([logits_by_hand(space.unflatten(points(ctx)[k]), x, False) for x, _ in batches])
        scored = y != -100
        expected = (logits.argmax(1)[scored] == y[scored]).double().mean()
        assert float(stats.accuracy[k]) == pytest.approx(float(expected), rel=1e-15)


def test_all_labels_ignored_means_no_accuracy() -> None:
    batches = [(x, torch.full_like(y, -100)) for x, y in dict_batches()]
    ev = PointEvaluator(dict_context(KwargClassifier(), batches, "cross_entropy"), backend="loop")
    assert ev.kind is None and any("-100" in n for n in ev.notes)


def test_bn_recompute_on_dict_batches_equals_cumulative_train_mode_passes() -> None:
    batches = dict_batches()
    model = KwargClassifier(batchnorm=True)
    ctx = dict_context(model, batches, "model")
    ev = PointEvaluator(ctx, backend="loop", bn_recompute=True)
    P = points(ctx)
    stats = ev.evaluate(P)
    assert ev.bn_recompute and not ev.notes
    y = torch.cat([b[1] for b in batches])
    for k in range(P.shape[0]):
        m = copy.deepcopy(ctx.model)
        torch.nn.utils.vector_to_parameters(P[k], m.parameters())
        m.norm.reset_running_stats()  # as torch.optim.swa_utils.update_bn, with keyword arguments
        m.norm.momentum = None
        m.train()
        with torch.no_grad():
            for x, _ in batches:
                m(**x)
        m.eval()
        with torch.no_grad():
            logits = torch.cat([m(**x)["logits"] for x, _ in batches])
        assert float(stats.loss[k]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-12)


# ------------------------------------------------------------------------------ token weighting
@pytest.mark.parametrize("backend", ["vmap", "loop"])
@pytest.mark.parametrize("loss", ["model", "cross_entropy"])
@pytest.mark.parametrize("layout", ["dict", "tensor"])
def test_token_level_loss_is_the_mean_over_every_counted_target(layout: str, loss: str, backend: str) -> None:
    batches = dict_batches(token_level=True)
    if layout == "tensor":  # the token ids alone, passed positionally
        batches = [(x["input_ids"], y) for x, y in batches]
    ctx = dict_context(KwargClassifier(token_level=True), batches, loss, token_weighted=True)
    ev = PointEvaluator(ctx, backend=backend)
    P = points(ctx)
    stats = ev.evaluate(P)
    assert ev.kind is None and stats.accuracy is None
    space = FlatSpace.of(ctx.params)
    counts = [int((y != -100).sum()) for _, y in batches]
    assert counts == [14, 4] and ctx.counted == 18
    for k in range(P.shape[0]):
        params = space.unflatten(P[k])
        sums, means = [], []
        for x, y in batches:
            x = x if layout == "dict" else {"input_ids": x}
            logits = logits_by_hand(params, x, token_level=True).reshape(-1, CLASSES)
            sums.append(F.cross_entropy(logits, y.reshape(-1), ignore_index=-100, reduction="sum"))
            means.append(F.cross_entropy(logits, y.reshape(-1), ignore_index=-100))
        token_mean = float(sum(sums)) / sum(counts)
        sample_weighted = float(sum(m * len(y) for m, (_, y) in zip(means, batches))) / 7
        assert abs(token_mean - sample_weighted) > 1e-2 * token_mean  # the weighting matters here
        assert float(stats.loss[k]) == pytest.approx(token_mean, rel=1e-12)


def test_a_batch_without_counted_targets_adds_nothing() -> None:
    batches = dict_batches(token_level=True)
    x, y = batches[1]
    batches = [batches[0], (x, torch.full_like(y, -100))]
    ctx = dict_context(KwargClassifier(token_level=True), batches, "cross_entropy", token_weighted=True)
    stats = PointEvaluator(ctx, backend="vmap").evaluate(points(ctx)[:1])
    x0, y0 = batches[0]
    want = F.cross_entropy(logits_by_hand(ctx.params, x0, True).reshape(-1, CLASSES), y0.reshape(-1), ignore_index=-100)
    assert float(stats.loss[0]) == pytest.approx(float(want), rel=1e-12)


# ------------------------------------------------------------------------------ transformers
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # sdpa under vmap: a slow fallback
def test_bert_sequence_classifier_is_scored_on_its_logits() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=8, num_labels=CLASSES,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    batches = dict_batches()
    ctx = dict_context(model, batches, "model")
    ev = PointEvaluator(ctx)
    P = points(ctx)
    stats = ev.evaluate(P)
    assert ev.kind == "argmax" and stats.accuracy is not None
    space = FlatSpace.of(ctx.params)
    y = torch.cat([b[1] for b in batches])
    for k in range(P.shape[0]):
        m = copy.deepcopy(ctx.model)
        m.load_state_dict(space.unflatten(P[k]), strict=False)
        with torch.no_grad():
            logits = torch.cat([m(**x).logits for x, _ in batches])
        assert float(stats.loss[k]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-10)
        assert float(stats.accuracy[k]) == pytest.approx(float((logits.argmax(1) == y).double().mean()), rel=1e-15)
