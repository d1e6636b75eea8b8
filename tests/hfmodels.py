"""Factories for the transformers / sequence tests (importable as ``hfmodels``: tests/ is on sys.path)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

VOCAB = 7


def gpt_config(**overrides):
    import transformers

    settings = dict(
        vocab_size=VOCAB,
        n_positions=8,
        n_embd=4,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    settings.update(overrides)
    return transformers.GPT2Config(**settings)


def build_gpt(seed: int = 0, use_cache: bool = True):
    """A tiny GPT2LMHeadModel (tied lm_head), with its key/value cache on as a user's model would have."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(gpt_config(use_cache=use_cache))
    with torch.no_grad():  # larger weights than the 0.02 init, so the Hessian is far from zero
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def gpt_batches() -> list[dict[str, torch.Tensor]]:
    """Two HF-style batches with padding: 3 sequences of width 6 and 2 of width 4, so the batches hold
    different numbers of counted (shifted, non-padding) tokens than their sequence counts suggest."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n, width, lengths in ((3, 6, (6, 3, 2)), (2, 4, (4, 4))):
        ids = torch.randint(1, VOCAB, (n, width), generator=g)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, length in enumerate(lengths):
            mask[i, :length] = 1
        ids = ids.masked_fill(mask == 0, 0)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def gpt_inputs_only() -> list[dict[str, torch.Tensor]]:
    return [{k: v for k, v in b.items() if k != "labels"} for b in gpt_batches()]


def gpt_token_targets() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids [B, T], next-token targets [B, T]) with -100 on padding: for --loss cross_entropy."""
    out = []
    for b in gpt_batches():
        ids, labels = b["input_ids"], b["labels"]
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        out.append((ids, targets))
    return out


def ids_mask_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b["input_ids"], b["attention_mask"]) for b in gpt_batches()]


class IdsMaskModel(nn.Module):
    """Takes (ids, mask) positionally; returns [B, T, D] from its encoder and logits per sequence."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 5)
        self.encoder = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encoder(self.emb(ids)))
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def build_ids_mask_model() -> IdsMaskModel:
    return IdsMaskModel()


class SeqClassifier(nn.Module):
    """An LSTM classifier: mkldnn's LSTM on CPU has no forward-mode AD."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def build_lstm() -> SeqClassifier:
    return SeqClassifier()


def seq_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 5, 3, generator=g), torch.randint(0, 2, (6,), generator=g)) for _ in range(2)]


def image_dicts() -> list[dict[str, torch.Tensor]]:
    """``{image, label}`` dicts for tinymodels.build_tiny (forward(x)): the keys are not argument names."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(12, 4, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return [{"image": X[i : i + 6], "label": y[i : i + 6]} for i in (0, 6)]


def numpy_data() -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(12, 4, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return X.numpy().astype(np.float64), y.numpy().astype(np.int32)


def torch_data() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = numpy_data()
    return torch.from_numpy(X), torch.from_numpy(y)


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], 3, -1))


def build_raises() -> Raises:
    return Raises()
