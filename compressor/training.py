"""The one training loop, shared by `finetune` and `distill`: seeded, dynamically padded,
AdamW with linear warm-up and decay, a progress bar, an optional custom loss."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from compressor.data import Example
from compressor.progress import progress_bar


@dataclass
class TrainSettings:
    """Optimisation settings (from a step's Config)."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 128
    seed: int = 0
    threads: int = 2


def collate(tokenizer: Any, rows: list[Example], task: str, label_map: dict[str, int], max_length: int) -> dict:
    """Tokenize a batch as torch tensors with `labels`; token tags go on each word's first sub-token."""
    import torch

    if task == "token-classification":
        enc = tokenizer([r.text for r in rows], is_split_into_words=True, padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        labels = torch.full(enc["input_ids"].shape, -100, dtype=torch.long)
        for b, row in enumerate(rows):
            previous = None
            for t, w in enumerate(enc.word_ids(b)):
                if w is not None and w != previous:
                    labels[b, t] = label_map[row.label[w]]
                previous = w
    else:
        enc = tokenizer([r.text for r in rows], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        labels = torch.tensor([label_map[r.label] for r in rows], dtype=torch.long)
    batch = dict(enc)
    batch["labels"] = labels
    return batch


def train(model: Any, tokenizer: Any, rows: list[Example], task: str, label_map: dict[str, int],
          settings: TrainSettings, *, loss_fn: Callable[[Any, dict], Any] | None = None,
          params: list[Any] | None = None, description: str = "train",
          on_epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train `model` in place on `rows`; returns the loss history.

    `loss_fn(model, batch)` replaces the default `model(**batch).loss` (distillation uses it).
    `params` limits what is optimised (head-only, BitFit); the rest is frozen by the caller.
    """
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    per_epoch = (len(rows) + settings.batch_size - 1) // settings.batch_size
    total = max(1, per_epoch * settings.epochs)
    warmup = max(1, int(settings.warmup_ratio * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    history: list[float] = []
    model.train()
    with progress_bar(total, description) as bar:
        for epoch in range(settings.epochs):
            order = list(range(len(rows)))
            rng.shuffle(order)
            running = 0.0
            for i in range(per_epoch):
                batch = collate(tokenizer, [rows[j] for j in order[i * settings.batch_size:(i + 1) * settings.batch_size]],
                                task, label_map, settings.max_length)
                loss = loss_fn(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                running += float(loss.detach())
                bar.advance(1, epoch=epoch + 1, loss=running / (i + 1))
            history.append(running / max(1, per_epoch))
            if on_epoch_end:
                model.eval()
                on_epoch_end(epoch)
                model.train()
    model.eval()
    return {"epoch_loss": history, "steps": total}
