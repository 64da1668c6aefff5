"""`trim-vocab`: keep only the embedding rows of tokens that occur in the recipe's training text,
plus special tokens and every single-character piece, and rewrite the tokenizer to match.

WordPiece picks the longest vocabulary entry that matches, so keeping every piece the training
text used (and dropping only pieces it never produced) leaves the tokenization of that text
unchanged, piece for piece; other text falls back to shorter pieces instead of [UNK].
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from compressor.models.artifact import Artifact
from compressor.errors import RecipeError, StepError
from compressor.hookspecs import hookimpl
from compressor.step import PlanContext, Step, StepConfig, StepContext


class TrimVocabConfig(StepConfig):
    """Settings of `trim-vocab`."""

    min_count: int = Field(default=1, ge=1, le=1_000_000,
                           description="Keep a token only if the training text uses it at least this often.")
    max_rows: int | None = Field(default=None, ge=1, description="Read only this many training rows.")
    keep_chars: bool = Field(default=True, description="Keep every single-character piece, so unseen words "
                                                       "split into characters rather than [UNK].")
    extra_tokens: list[str] = Field(default_factory=list, description="Tokens to keep whatever the data says.")
    text_file: str | None = Field(default=None, description="A plain-text file (one text per non-blank line, "
                                  "relative to the recipe) whose tokens count beside the training text's: a "
                                  "vocabulary for text the train rows do not cover.")


def tokenizer_model_type(path: Path) -> str | None:
    """The `model.type` of a tokenizer.json (WordPiece, BPE, Unigram), or None without one."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8")).get("model", {}).get("type")


class TrimVocab(Step):
    """Shrink the embedding table to the tokens the training text uses."""

    name = "trim-vocab"
    summary = "Keep only the vocabulary rows the training text uses (+ specials, characters); rewrite the tokenizer."
    version = "1"
    Config = TrimVocabConfig
    accepts = ("hf",)
    produces = "hf"
    needs_data = ("train",)
    content_fields = ("text_file",)

    def check(self, config: StepConfig, ctx: PlanContext) -> None:
        """Only WordPiece tokenizers (BERT family) are supported; a text_file exists."""
        assert isinstance(config, TrimVocabConfig)
        kind = tokenizer_model_type(ctx.source_path) if ctx.source_path else "WordPiece"
        if kind != "WordPiece":
            raise RecipeError(f"trim-vocab supports WordPiece tokenizers (BERT family); this model's tokenizer is "
                              f"{kind or 'missing its tokenizer.json'}", where="uses")
        if config.text_file is not None and not ctx.resolve(config.text_file).is_file():
            raise RecipeError(f"{ctx.resolve(config.text_file)} does not exist", where="with.text_file",
                              hint="fix the path (relative to the recipe file)")

    def resolve_config(self, config: StepConfig, ctx: PlanContext) -> StepConfig:
        """text_file resolved against the recipe's folder, so that its content keys the cache."""
        assert isinstance(config, TrimVocabConfig)
        if config.text_file is not None:
            config = config.model_copy(update={"text_file": str(ctx.resolve(config.text_file))})
        return config

    def run(self, artifact: Artifact, config: StepConfig, ctx: StepContext) -> Artifact:
        """Trim the embedding rows and the tokenizer; reports rows kept and coverage of the eval text."""
        assert isinstance(config, TrimVocabConfig)
        import torch

        from compressor.models.loading import load_tokenizer
        from compressor.models import load_model

        if tokenizer_model_type(artifact.path) != "WordPiece":
            raise StepError("trim-vocab supports WordPiece tokenizers with a tokenizer.json")
        tokenizer = load_tokenizer(artifact.path)
        rows = ctx.data.load("train")[: config.max_rows] if config.max_rows else ctx.data.load("train")
        from compressor.tasks import task_for

        split = task_for(artifact.task).word_level
        counts: collections.Counter[int] = collections.Counter()
        texts = [r.text for r in rows]
        if config.text_file is not None:
            from compressor.models.data import read_text_rows

            lines = [r.text for r in read_text_rows(Path(config.text_file))]
            texts += [line.split() for line in lines] if split else lines
        for i in range(0, len(texts), 1024):
            for ids in tokenizer(texts[i : i + 1024], add_special_tokens=False, is_split_into_words=split)["input_ids"]:
                counts.update(ids)
        vocab: dict[str, int] = tokenizer.get_vocab()
        keep = {i for i, c in counts.items() if c >= config.min_count}
        keep |= set(tokenizer.all_special_ids)
        keep |= set(tokenizer.added_tokens_decoder)  # added tokens live outside the WordPiece vocab: keep all
        keep |= {i for t, i in vocab.items() if t in config.extra_tokens}
        if config.keep_chars:
            keep |= {i for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
        kept = sorted(keep)
        old_to_new = {old: new for new, old in enumerate(kept)}
        model = load_model(artifact)
        old_emb = model.get_input_embeddings()
        pad = model.config.pad_token_id
        new_emb = torch.nn.Embedding(len(kept), old_emb.embedding_dim,
                                     padding_idx=old_to_new.get(pad) if pad is not None else None)
        with torch.no_grad():
            new_emb.weight.copy_(old_emb.weight[torch.tensor(kept)])
        model.set_input_embeddings(new_emb)
        model.config.vocab_size = len(kept)
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
            value = getattr(model.config, attr, None)
            if isinstance(value, int) and value in old_to_new:
                setattr(model.config, attr, old_to_new[value])
        model.save_pretrained(str(ctx.out_dir), safe_serialization=True)
        write_trimmed_tokenizer(artifact.path, ctx.out_dir, kept)
        ctx.report(rows_before=len(vocab), rows_kept=len(kept),
                   embedding_params_before=old_emb.weight.numel(), embedding_params_after=new_emb.weight.numel(),
                   train_rows=len(rows), text_file_rows=len(texts) - len(rows), **_coverage(tokenizer, ctx, artifact.task, ctx.out_dir))
        return artifact.derive(ctx.out_dir)


def write_trimmed_tokenizer(src: Path, dst: Path, kept: list[int]) -> None:
    """Rewrite tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json with new ids."""
    import shutil

    old_to_new = {old: new for new, old in enumerate(kept)}
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    id_to_token = {i: t for t, i in vocab.items()}
    for token in data.get("added_tokens") or []:
        id_to_token.setdefault(token["id"], token["content"])
    wordpiece_ids = set(vocab.values())  # added tokens stay in added_tokens, outside the model's vocab
    data["model"]["vocab"] = {id_to_token[old]: new for new, old in enumerate(kept) if old in wordpiece_ids}
    for token in data.get("added_tokens") or []:
        token["id"] = old_to_new[token["id"]]
    _remap_ids(data.get("post_processor"), old_to_new)
    if data.get("padding") and "pad_id" in data["padding"]:
        data["padding"]["pad_id"] = old_to_new.get(data["padding"]["pad_id"], 0)
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (dst / "vocab.txt").write_text("".join(id_to_token[old] + "\n" for old in kept), encoding="utf-8")
    config_file = src / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            config["added_tokens_decoder"] = {str(old_to_new[int(k)]): v for k, v in decoder.items()
                                              if int(k) in old_to_new}
        (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    if (src / "special_tokens_map.json").is_file():
        shutil.copy2(src / "special_tokens_map.json", dst / "special_tokens_map.json")


def _remap_ids(node: Any, old_to_new: dict[int, int]) -> None:
    """Remap the token ids a post-processor holds (TemplateProcessing, BertProcessing, Sequence)."""
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "TemplateProcessing":
            for special in node.get("special_tokens", {}).values():
                special["ids"] = [old_to_new[i] for i in special["ids"]]
        elif kind in ("BertProcessing", "RobertaProcessing"):
            for key in ("sep", "cls"):
                node[key] = [node[key][0], old_to_new[node[key][1]]]
        for child in node.get("processors", []) or []:
            _remap_ids(child, old_to_new)


def _coverage(old_tokenizer: Any, ctx: StepContext, task: str, out_dir: Path) -> dict[str, float]:
    """Share of eval rows that tokenize to exactly the same pieces after trimming."""
    if ctx.data is None or not ctx.data.has("eval"):
        return {}
    from compressor.models.loading import load_tokenizer

    new_tokenizer = load_tokenizer(out_dir)
    texts = [r.text for r in ctx.data.load("eval")]
    from compressor.tasks import task_for

    split = task_for(task).word_level
    old = old_tokenizer(texts, add_special_tokens=False, is_split_into_words=split)
    new = new_tokenizer(texts, add_special_tokens=False, is_split_into_words=split)
    same = sum(old.tokens(i) == new.tokens(i) for i in range(len(texts)))
    return {"eval_rows_tokenized_identically": same / max(1, len(texts))}


@hookimpl
def register_steps(register: Callable[[type[Step]], None]) -> None:
    """The `trim-vocab` step."""
    register(TrimVocab)
