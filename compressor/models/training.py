"""The one training loop, shared by `finetune` and `distill`: seeded, dynamically padded,
AdamW with linear warm-up and decay, a progress bar, an optional custom loss."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import Field

from compressor.models.data import Example
from compressor.run.progress import progress_bar
from compressor.step import StepConfig


class TrainConfig(StepConfig):
    """Optimisation fields shared by the steps that train (finetune, distill)."""

    epochs: int = Field(default=1, ge=1, le=100, description="Passes over the training rows.")
    max_train_rows: int | None = Field(default=None, ge=1, le=10_000_000,
                                       description="Train on a seeded random sample of this many rows.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Rows per optimisation step.")
    learning_rate: float = Field(default=5e-5, gt=0, le=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=0.01, ge=0, le=1, description="AdamW weight decay (matrices only).")
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    max_length: int = Field(default=128, ge=8, le=512, description="Tokens kept per row.")

    def settings(self, seed: int, threads: int) -> "TrainSettings":
        """These fields as TrainSettings for `train`."""
        return TrainSettings(epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                             weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                             max_length=self.max_length, seed=seed, threads=threads)


def sample_rows(rows: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded random sample of `limit` rows (all rows when limit is None or larger)."""
    if limit and limit < len(rows):
        return random.Random(seed).sample(rows, limit)
    return rows




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
    """Tokenize a batch as torch tensors with `labels`, the way the task collates it."""
    from compressor.tasks import task_for

    return task_for(task).collate(tokenizer, rows, label_map, max_length)


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


def evaluate_in_memory(model: Any, tokenizer: Any, rows: list[Example], task: str, labels: list[str],
                       max_length: int) -> float:
    """The task's primary metric (accuracy, entity F1, perplexity, ...) of an in-memory PyTorch model on `rows`."""
    from compressor.tasks import task_for

    model.eval()
    value = task_for(task).evaluate_in_memory(model, tokenizer, rows, labels, max_length)
    model.train()
    return value
