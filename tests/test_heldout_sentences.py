"""bench/answers_heldout_sentences.py picks whole sentences that share no text with the rows steps train on."""

from __future__ import annotations

from compressor.models.data import Example
from compressor.testing import bench_module

TEMPLATE = "Review: {text}"


def _heldout_sentences():
    return bench_module("answers_heldout_sentences").heldout_sentences


def _row(text: str) -> Example:
    return Example(TEMPLATE.replace("{text}", text), "positive")


def test_only_unrelated_whole_sentences_of_enough_words_are_chosen() -> None:
    texts = [
        "a warm and funny film about two brothers and their dog",   # whole, long, unrelated: chosen
        "a warm and funny film about two brothers",                 # a phrase of the one above: not whole
        "the plot never quite comes together in the end at all",    # contains a trained row
        "never quite comes together",                               # trained on
        "short but sweet",                                          # too few words
        "an ambitious failure that still rewards a patient viewer",  # a tuning row
        "every scene looks like it was shot through a dirty window",  # whole, long, unrelated: chosen
    ]
    rows = [_row(t) for t in texts]
    train = [r for r in rows if r.text != _row(texts[5]).text]
    chosen = _heldout_sentences()(train, [rows[5]], texts, [rows[3]], TEMPLATE, rows=10, min_words=8, seed=0)
    assert sorted(r.text for r in chosen) == sorted([rows[0].text, rows[6].text])
    assert len(_heldout_sentences()(train, [rows[5]], texts, [rows[3]], TEMPLATE, rows=1, min_words=8, seed=0)) == 1
