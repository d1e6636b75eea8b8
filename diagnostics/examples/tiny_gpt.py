"""A tiny GPT-2 (transformers) on the Zen of Python, character level: data, model and training.

Nothing is downloaded: the text ships with Python (the stdlib module ``this`` holds the Zen of Python,
ROT13-encoded; its source file is read, never imported, so nothing is printed), the vocabulary is its
characters, and the model is built from a ``GPT2Config`` with random initial weights.

* :func:`zen_lines`: the 20 lines of the Zen (title included).
* :func:`zen_batches`: HF-style dict batches ``{input_ids, attention_mask, labels}``, one line per
  sequence, right-padded, ``labels = -100`` on padding: batches hold different numbers of counted tokens,
  which is what the token-weighted loss of ``diag`` accounts for.
* :func:`build_gpt`: the ``GPT2LMHeadModel`` (tied input/output embeddings, no dropout).
* :func:`train_trainer`: full-batch AdamW training with the real ``transformers.Trainer`` (needs
  ``pip install 'training-diagnostics[hf]'``), writing ``checkpoint-N/`` folders.
"""

from __future__ import annotations

import codecs
import importlib.util
from pathlib import Path
from typing import Any

import torch

PAD = "\0"  # id 0: padding (never a target)


def zen_lines() -> list[str]:
    """The Zen of Python (title and 19 aphorisms), decoded from the source of the stdlib module ``this``."""
    spec = importlib.util.find_spec("this")
    if spec is None or spec.origin is None:  # pragma: no cover - every CPython ships it
        raise RuntimeError("the standard library module 'this' is missing")
    source = Path(spec.origin).read_text(encoding="utf-8")
    encoded = source.split('s = """', 1)[1].split('"""', 1)[0]
    text = codecs.decode(encoded, "rot13")
    return [line for line in text.splitlines() if line.strip()]


def vocabulary() -> list[str]:
    """The characters of the Zen, sorted, after the padding character (id 0)."""
    return [PAD, *sorted({c for line in zen_lines() for c in line})]


def zen_batches(batch_size: int = 20, max_len: int = 48) -> list[dict[str, torch.Tensor]]:
    """HF-style batches of the Zen: one line per sequence (cut to ``max_len`` characters), right-padded.

    Args:
        batch_size: sequences per batch (the last batch may be smaller; 20 = one batch of every line).
        max_len: the longest sequence kept.

    Returns:
        ``[{"input_ids": [B, T] int64, "attention_mask": [B, T], "labels": [B, T] (-100 on padding)}]``.
    """
    stoi = {c: i for i, c in enumerate(vocabulary())}
    lines = [line[:max_len] for line in zen_lines()]
    out = []
    for start in range(0, len(lines), batch_size):
        chunk = lines[start : start + batch_size]
        width = max(len(line) for line in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, line in enumerate(chunk):
            ids[i, : len(line)] = torch.tensor([stoi[c] for c in line])
            mask[i, : len(line)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def build_gpt(n_embd: int = 32, n_layer: int = 2, n_head: int = 2, seed: int = 0) -> Any:
    """A ``GPT2LMHeadModel`` over the Zen's characters (tied embeddings, dropout off), seeded weights."""
    from diagnostics.hf import require_transformers

    transformers = require_transformers("the tiny GPT example")
    config = transformers.GPT2Config(
        vocab_size=len(vocabulary()),
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


class _Lines(torch.utils.data.Dataset):
    """The Zen's lines as a map-style dataset of per-line dicts, padded to a common width."""

    def __init__(self, max_len: int) -> None:
        batch = zen_batches(batch_size=10_000, max_len=max_len)[0]
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def train_trainer(
    out: str | Path,
    *,
    lr: float = 3e-3,
    steps: int = 400,
    save_every: int = 50,
    seed: int = 0,
    max_len: int = 48,
    n_embd: int = 32,
) -> Path:
    """Full-batch AdamW training of :func:`build_gpt` with ``transformers.Trainer``; returns ``out``.

    Every line of the Zen is in the one batch (``per_device_train_batch_size`` = 20), the learning rate
    is constant (no warm-up), ``beta1 = 0.9``: the setting of Cohen et al. 2022, where Adam's
    preconditioned sharpness rises to ``38 / lr``. The Trainer writes ``out/checkpoint-N/`` every
    ``save_every`` steps (config.json, model.safetensors, optimizer.pt, trainer_state.json, ...).
    """
    from diagnostics.hf import require_transformers

    transformers = require_transformers("training the tiny GPT example")
    data = _Lines(max_len)
    model = build_gpt(n_embd=n_embd, seed=seed)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=len(data),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=None,
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_grad_norm=0.0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return Path(out)
