"""Entity-level F1 (CoNLL style) for token classifiers, on PyTorch or ONNX Runtime."""

from __future__ import annotations

from typing import Any

from compressor.artifact import Artifact
from compressor.data import Example
from compressor.evaluators.base import EvalSettings, predict_batches


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


class TokenClassificationEvaluator:
    """Entity F1 for `token-classification`, plus latency on the artifact's runtime."""

    task = "token-classification"
    formats = ("hf", "onnx", "ort", "engine")
    metric = "f1"

    def evaluate(self, artifact: Artifact, rows: list[Example], settings: EvalSettings) -> dict[str, Any]:
        """Entity-level precision, recall and F1 on `rows`; latency if asked."""
        from compressor.evaluators.measure import latency
        from compressor.evaluators.runtime import load_runner

        runner = load_runner(artifact, settings.threads)
        words = [r.text for r in rows]
        preds: list[list[str]] = []
        for i, (enc, logits) in enumerate(predict_batches(runner, words)):
            chunk = words[i * 32 : (i + 1) * 32]
            preds += word_predictions(enc, logits, artifact.labels, [len(w) for w in chunk])
        result: dict[str, Any] = {**entity_f1([r.label for r in rows], preds), "rows": len(rows)}
        if settings.latency:
            result["latency"] = latency(runner, words, list(settings.batch_sizes), settings.runs, settings.warmup)
        return result
