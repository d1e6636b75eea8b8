"""Models and data in the transformers layout for the dynamics and stability tests, and hand computations.

A batch is a dict of tensors passed to the model as keyword arguments (``input_ids``, ``attention_mask``,
``labels``); the model returns a dict-like output with ``.loss`` (when given labels) and ``.logits``, as a
transformers ``ModelOutput`` does. The CLI tests name these factories by file path (``kwmodels.py:...``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
VOCAB, HIDDEN, CLASSES, WIDTH = 7, 5, 3, 4
F64 = torch.float64


def spec(name: str) -> str:
    """``--model`` / ``--data`` spec of a callable of this file."""
    return f"{HERE / 'kwmodels.py'}:{name}"


class KwOutput(dict):
    """A ``ModelOutput`` stand-in: a dict whose entries are also attributes; None entries are left out."""

    def __init__(self, **fields: torch.Tensor | None) -> None:
        super().__init__((k, v) for k, v in fields.items() if v is not None)

    def __getattr__(self, key: str) -> torch.Tensor | None:
        return self.get(key)


class KwClassifier(nn.Module):
    """Mean-pooled embeddings -> Linear -> ReLU -> Linear classifier; ``forward(input_ids, attention_mask, labels)``."""

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.pre = nn.Linear(HIDDEN, HIDDEN)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():  # large logits: some samples' softmax collapses in float32
            self.emb.weight.mul_(scale)
            self.classifier.weight.mul_(scale)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The input of ``classifier``."""
        return self.act(self.pre(self.pooled(input_ids, attention_mask)))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> KwOutput:
        logits = self.classifier(self.features(input_ids, attention_mask))
        return KwOutput(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


class KwTagger(nn.Module):
    """Per-token classifier: ``[B, T, C]`` logits; its loss is the mean over the batch's non -100 labels."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():
            self.emb.weight.mul_(2.0)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> KwOutput:
        logits = self.head(torch.tanh(self.emb(input_ids)) * attention_mask.unsqueeze(-1).to(self.head.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, CLASSES), labels.reshape(-1), ignore_index=-100)
        return KwOutput(loss=loss, logits=logits)


def build_classifier() -> KwClassifier:
    return KwClassifier(seed=0, scale=12.0)


def build_tagger() -> KwTagger:
    return KwTagger(seed=1)


def _ids_and_mask(n: int, lengths: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (n, WIDTH), generator=g)
    mask = torch.zeros(n, WIDTH, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


def cls_batches() -> list[dict[str, torch.Tensor]]:
    """Two dict batches of 20 and 12 padded sequences with one class label each."""
    g = torch.Generator().manual_seed(11)
    out = []
    for n in (20, 12):
        ids, mask = _ids_and_mask(n, torch.randint(1, WIDTH + 1, (n,), generator=g).tolist(), g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, CLASSES, (n,), generator=g)})
    return out


def token_batches() -> list[dict[str, torch.Tensor]]:
    """Two dict batches of per-token labels (-100 on padding): 3 sequences with 5 counted tokens, 2 with 8, so a
    batch's share of the counted targets (5/13, 8/13) differs from its share of the samples (3/5, 2/5)."""
    g = torch.Generator().manual_seed(12)
    out = []
    for n, lengths in ((3, [2, 2, 1]), (2, [4, 4])):
        ids, mask = _ids_and_mask(n, lengths, g)
        labels = torch.randint(0, CLASSES, (n, WIDTH), generator=g).masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


# ------------------------------------------------------------------------------------ hand computations
def joined(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The batches concatenated along the sample axis (all have width ``WIDTH``)."""
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def gradient_cosine(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> float:
    """``cos(grad L, w)`` over every parameter of ``model`` (float64), ``L = loss_of(model)``."""
    params = list(model.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_of(model), params)])
    w = torch.cat([p.detach().reshape(-1) for p in params])
    return float(torch.dot(g, w) / (g.norm() * w.norm()))


def token_mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Cross-entropy averaged over every counted (non -100) target of the data."""
    d = joined(batches)
    logits = model(d["input_ids"], d["attention_mask"]).logits
    return F.cross_entropy(logits.reshape(-1, CLASSES), d["labels"].reshape(-1), ignore_index=-100)


def batch_mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """``sum_b n_b L_b / N`` with ``L_b`` each batch's own token mean: weighting batches by samples (wrong)."""
    n = [int(b["labels"].shape[0]) for b in batches]
    losses = [model(**b).loss for b in batches]
    return sum(k * loss for k, loss in zip(n, losses)) / sum(n)


def sample_mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Cross-entropy averaged over every sample of the data."""
    d = joined(batches)
    return F.cross_entropy(model(d["input_ids"], d["attention_mask"]).logits, d["labels"])


def collapse_fraction(model: nn.Module, batches: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> float:
    """Fraction of samples whose true-class softmax is exactly 1 with the forward pass in ``dtype``."""
    import copy

    m = copy.deepcopy(model).to(dtype)
    d = joined(batches)
    with torch.no_grad():
        p = torch.softmax(m(d["input_ids"], d["attention_mask"]).logits, dim=-1)
    return float((p.gather(1, d["labels"].reshape(-1, 1)) == 1).double().mean())


def stability_by_hand(
    features: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    head: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    p: float,
    passes: int,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Per-pass prediction agreement and mean KL(clean || dropout) with inverted dropout of rate ``p`` on the input
    ``features(batch)`` of ``head``; pass ``k`` draws its masks batch by batch from stream ``k`` of ``seed``."""
    agree, kl = [], []
    with torch.no_grad():
        feats = [features(b) for b in batches]
        clean = torch.log_softmax(torch.cat([head(z) for z in feats]).to(F64), 1)
        for k in range(passes):
            gen = torch.Generator().manual_seed((seed * 1_000_003 + k) % (2**63 - 1))  # Context.generator(k)
            drop = []
            for z in feats:
                keep = torch.rand(z.shape, generator=gen) >= p
                drop.append(head(z * (keep.to(z.dtype) / (1 - p))))
            lq = torch.log_softmax(torch.cat(drop).to(F64), 1)
            agree.append(float((clean.argmax(1) == lq.argmax(1)).double().mean()))
            kl.append(float((clean.exp() * (clean - lq)).sum(1).mean()))
    return agree, kl


def classifier_features(model: KwClassifier) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The input of ``model.classifier`` for a batch."""
    return lambda b: model.features(b["input_ids"], b["attention_mask"])


def build_bert(seed: int = 0) -> nn.Module:
    """A tiny ``BertForSequenceClassification`` from a config (3 classes, vocabulary ``VOCAB``), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=WIDTH,
        num_labels=CLASSES,
    )
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # larger weights than the 0.02 init, so the predictions vary between samples
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def bert_features(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The input of a ``BertForSequenceClassification``'s ``classifier`` (its pooled output; dropout is off)."""
    return lambda b: model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output
