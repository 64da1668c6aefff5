"""`text-classification`: one label per sentence (SST-2), scored by accuracy."""

from __future__ import annotations

from typing import Any

from compressor.tasks.base import Metric, Task


class TextClassification(Task):
    """A sentence classifier (BertForSequenceClassification and the like)."""

    name = "text-classification"
    summary = "one label per text; accuracy"
    auto_class = "AutoModelForSequenceClassification"
    head_suffix = "ForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    export_task = "text-classification"
    metrics = (Metric("accuracy", top=1.0),)
    golden_inputs = ("a gripping , beautifully made film .", "the plot is thin and the jokes fall flat .")

    def collate(self, tokenizer: Any, rows: list[Any], label_map: dict[str, int], max_length: int) -> dict:
        """Padded sentences with one label id each."""
        import torch

        batch = dict(self.encode(tokenizer, [r.text for r in rows], max_length, tensors="pt"))
        batch["labels"] = torch.tensor([label_map[r.label] for r in rows], dtype=torch.long)
        return batch

    def predictions(self, encoded: Any, logits: Any, labels: list[str], texts: list[Any]) -> list[int]:
        """The arg-max label id of each sentence."""
        return [int(i) for i in logits.argmax(-1)]

    def score(self, rows: list[Any], predictions: list[Any], labels: list[str]) -> dict[str, float]:
        """Accuracy against the rows' labels (names, or ids as SST-2 writes them)."""
        from compressor.models.data import label_ids

        mapping = label_ids(labels, {r.label for r in rows})
        hits = sum(p == mapping[r.label] for p, r in zip(predictions, rows))
        return {"accuracy": hits / max(1, len(rows))}
