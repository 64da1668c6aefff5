"""`token-classification`: one IOB tag per word (CoNLL-2003 NER), scored by entity-level F1."""

from __future__ import annotations

from typing import Any

from compressor.tasks.base import Metric, Task


def entity_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """Spans (start, end, type) of IOB1/IOB2 tags; an `I-X` after another type starts an entity, as in conlleval."""
    spans: set[tuple[int, int, str]] = set()
    start, kind = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        begins = prefix == "B" or (prefix == "I" and label != kind)
        if kind is not None and (prefix == "O" or begins):
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix in ("B", "I") and begins:
            start, kind = i, label
    return spans


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over exact entity matches."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        gs, ps = entity_spans(g), entity_spans(p)
        tp += len(gs & ps)
        n_gold += len(gs)
        n_pred += len(ps)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def word_predictions(encoded: Any, logits: Any, labels: list[str], lengths: list[int]) -> list[list[str]]:
    """The tag of each word, taken from its first sub-token; truncated words get `O`."""
    out = []
    for b, length in enumerate(lengths):
        tags = ["O"] * length
        seen = set()
        for t, w in enumerate(encoded.word_ids(b)):
            if w is not None and w not in seen:
                seen.add(w)
                tags[w] = labels[int(logits[b, t].argmax())]
        out.append(tags)
    return out


class TokenClassification(Task):
    """A word tagger (BertForTokenClassification and the like): rows are word lists with a tag per word."""

    name = "token-classification"
    summary = "one tag per word; entity F1"
    auto_class = "AutoModelForTokenClassification"
    head_suffix = "ForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    export_task = "token-classification"
    metrics = (Metric("f1", top=1.0), Metric("precision", top=1.0), Metric("recall", top=1.0))
    word_level = True
    golden_inputs = ("EU rejects German call to boycott British lamb .", "Peter Blackburn reports from Brussels .")
    device_module = "compressor.tasks.device.entities"

    def collate(self, tokenizer: Any, rows: list[Any], label_map: dict[str, int], max_length: int) -> dict:
        """Padded word lists; each word's tag goes on its first sub-token, the other positions are -100."""
        import torch

        enc = self.encode(tokenizer, [r.text for r in rows], max_length, tensors="pt")
        labels = torch.full(enc["input_ids"].shape, -100, dtype=torch.long)
        for b, row in enumerate(rows):
            previous = None
            for t, w in enumerate(enc.word_ids(b)):
                if w is not None and w != previous:
                    labels[b, t] = label_map[row.label[w]]
                previous = w
        batch = dict(enc)
        batch["labels"] = labels
        return batch

    def predictions(self, encoded: Any, logits: Any, labels: list[str], texts: list[Any]) -> list[list[str]]:
        """The tag of every word."""
        return word_predictions(encoded, logits, labels, [len(t) for t in texts])

    def score(self, rows: list[Any], predictions: list[Any], labels: list[str]) -> dict[str, float]:
        """Entity-level precision, recall and F1 against the rows' tags."""
        return entity_f1([r.label for r in rows], predictions)

    def distill_targets(self, student_logits: Any, teacher_logits: Any, labels: Any) -> tuple[Any, Any, Any]:
        """One row per tagged sub-token (the first of each word)."""
        keep = labels != -100
        return student_logits[keep], teacher_logits[keep], labels[keep]
