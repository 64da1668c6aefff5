"""Word tagging (NER) on the device: the tag of each word's first token, grouped into IOB entities."""

from __future__ import annotations

import sys
from typing import Any

if "predict" in sys.modules:  # inside a bundle: its own predict.py, which loaded this file
    from predict import LogitAnswers, softmax
else:
    from compressor.bundle.device.runtime import LogitAnswers, softmax


def entities(words: list[str], tags: list[str]) -> list[dict[str, Any]]:
    """IOB tags to [{type, text, start, end}] over word indices."""
    found: list[dict[str, Any]] = []
    for i, tag in enumerate(tags + ["O"]):
        prefix, _, kind = tag.partition("-")
        if found and found[-1]["end"] == i and prefix == "I" and found[-1]["type"] == kind:
            found[-1]["end"] = i + 1
            found[-1]["text"] = " ".join(words[found[-1]["start"]:i + 1])
        elif prefix in ("B", "I") and i < len(words):
            found.append({"type": kind, "text": words[i], "start": i, "end": i + 1})
    return found


class Answers(LogitAnswers):
    """A list of entities per text (words split on spaces, or given as a list)."""

    def decode(self, texts: list[Any], encodings: list[Any], logits: Any) -> list[Any]:
        """Each word takes the tag of its first token; consecutive B-/I- tags of a kind form one entity."""
        labels = self.predictor.manifest["labels"]
        probs = softmax(logits)
        out = []
        for b, (text, enc) in enumerate(zip(texts, encodings)):
            words = text.split() if isinstance(text, str) else list(text)
            tags, seen = ["O"] * len(words), set()
            for t, w in enumerate(enc.word_ids):
                if w is not None and w not in seen:
                    seen.add(w)
                    tags[w] = labels[int(probs[b, t].argmax())]
            out.append(entities(words, tags))
        return out
