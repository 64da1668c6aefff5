"""What trim-vocab's choice of rows costs, measured in PyTorch on the distilled model of an edge run: the
recipe's `min_count` against other counts, against keeping besides them the lowest ids of the original
vocabulary (BERT's WordPiece ids run roughly in order of frequency), and against mapping each dropped
token to its nearest kept one (cosine of the input embeddings, words to words and ##-pieces to ##-pieces),
so that WordPiece still sees every word whole. Accuracy on the recipe's tuning rows (its held-out whole
sentences) and on its eval rows. Prints a table; asserts nothing.

    python bench/trim_vocab_variants.py runs/minilm-sst2-edge [--min-count 1 2 3] [--lowest-ids 5000 10000]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any


def accuracy(model: Any, tokenizer: Any, rows: list[Any], ids: dict[int, int] | None = None) -> float:
    """Share of rows whose argmax is their label; `ids` maps the tokenizer's ids to embedding rows."""
    import torch

    tokenizer.no_padding()
    tokenizer.enable_truncation(64)
    correct = 0
    for i in range(0, len(rows), 64):
        batch = rows[i : i + 64]
        encodings = tokenizer.encode_batch([r.text for r in batch])
        width = max(len(e.ids) for e in encodings)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for j, e in enumerate(encodings):
            row = [ids[k] for k in e.ids] if ids is not None else e.ids
            input_ids[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        with torch.no_grad():
            predicted = model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1).tolist()
        correct += sum(p == int(r.label) for p, r in zip(predicted, batch))
    return correct / len(rows)


def nearest_kept(weights: Any, kept: list[int], id_to_token: dict[int, str], never: set[int]) -> dict[int, int]:
    """Every original id → an embedding row of `kept`: its own, or the nearest kept token of its kind."""
    import torch

    position = {old: new for new, old in enumerate(kept)}
    kept_vectors = torch.nn.functional.normalize(weights[torch.tensor(kept)], dim=1)
    is_piece = torch.tensor([id_to_token[i].startswith("##") for i in kept])
    barred = torch.tensor([i in never for i in kept])
    dropped = [i for i in range(weights.shape[0]) if i not in position]
    similarity = torch.nn.functional.normalize(weights[torch.tensor(dropped)], dim=1) @ kept_vectors.T
    mapping = dict(position)
    for row, old in enumerate(dropped):
        scores = similarity[row].masked_fill(barred | (is_piece != id_to_token[old].startswith("##")), -2.0)
        mapping[old] = int(scores.argmax())
    return mapping


def main() -> None:
    """Score every variant on the run's tuning and eval rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run of recipes/minilm-sst2-edge.yaml")
    parser.add_argument("--min-count", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--lowest-ids", type=int, nargs="+", default=[5000, 10000])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    from compressor.plugins.trim_vocab import write_trimmed_tokenizer
    from compressor.host import build_host
    from compressor.recipe.plan import build_plan

    torch.set_num_threads(args.threads)
    record = json.loads((args.run_dir / "record.json").read_text())
    distilled = Path(next(s["path"] for s in record["steps"] if s["uses"] == "distill"))
    data = build_plan(Path(record["recipe_path"]), build_host()).data
    train, tune, dev = data.load("train"), data.load("tune"), data.load("eval")
    model = AutoModelForSequenceClassification.from_pretrained(distilled).eval()
    weights = model.get_input_embeddings().weight.detach().clone()
    full = Tokenizer.from_file(str(distilled / "tokenizer.json"))
    id_to_token = {i: t for t, i in full.get_vocab().items()}
    counts: collections.Counter[int] = collections.Counter()
    for encoding in full.encode_batch([r.text for r in train], add_special_tokens=False):
        counts.update(encoding.ids)
    specials = {i for i, t in id_to_token.items() if t.startswith("[") and t.endswith("]") and "unused" not in t}
    chars = {i for i, t in id_to_token.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}

    rows = [("full vocabulary", len(id_to_token), accuracy(model, full, tune), accuracy(model, full, dev))]
    variants = [(f"min_count {n}", {i for i, c in counts.items() if c >= n}) for n in args.min_count]
    variants += [(f"min_count 2 + ids below {n}", {i for i, c in counts.items() if c >= 2} | set(range(n)))
                 for n in args.lowest_ids]
    work = Path(tempfile.mkdtemp(prefix="compressor-trim-"))
    for name, keep in variants:
        kept = sorted(keep | specials | chars)
        folder = work / name.replace(" ", "-")
        folder.mkdir()
        write_trimmed_tokenizer(distilled, folder, kept)
        trimmed = Tokenizer.from_file(str(folder / "tokenizer.json"))
        model.get_input_embeddings().weight.data = weights[torch.tensor(kept)]
        rows.append((name, len(kept), accuracy(model, trimmed, tune), accuracy(model, trimmed, dev)))
        if name == "min_count 2":
            mapping = nearest_kept(weights, kept, id_to_token, specials)
            rows.append((f"{name}, dropped tokens → nearest kept", len(kept), accuracy(model, full, tune, mapping),
                         accuracy(model, full, dev, mapping)))
        model.get_input_embeddings().weight.data = weights
    print(f"distilled model: {distilled}; tuning rows: {data.tuning_source()}; eval rows: {len(dev)}\n")
    print("| vocabulary | rows | tuning rows | eval rows |\n|---|---:|---:|---:|")
    for name, size, on_tune, on_dev in rows:
        print(f"| {name} | {size:,} | {on_tune:.4f} | {on_dev:.4f} |")


if __name__ == "__main__":
    main()
