"""A sentence-embedding model as compressor's steps handle it: the transformers encoder (BertModel and the like)
with its sentence-transformers pooling and normalization as the head, read from and written to the
sentence-transformers layout (`modules.json`, `1_Pooling/config.json`, `2_Normalize`), so that a compressed
`hf` artifact still loads in `SentenceTransformer(path)`.

The model stays an instance of the encoder's own class (a subclass adds the pooling to `forward`), so that
save_pretrained, peft, torch-pruning and the pruning of layers see the transformers model they know; its output's
`logits` is the sentence embedding, which is what compressor's shared code (parity checks, ONNX export, the
runners) reads from a model with a head. torch is imported only when a model is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import InputError

#: sentence-transformers' module types, as modules.json names them.
TRANSFORMER, POOLING, NORMALIZE = (f"sentence_transformers.models.{n}" for n in ("Transformer", "Pooling", "Normalize"))
#: The pooling modes compressor puts in the graph, by the key that turns each on in 1_Pooling/config.json.
POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
#: Modes sentence-transformers also has, which compressor refuses rather than computes differently.
OTHER_POOLING_KEYS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one sentence vector: `mode` (mean, cls, max), then L2 normalization or not.
    `include_prompt` is sentence-transformers' flag for prompt tokens; compressor feeds no prompts, so it is kept
    as read and written back."""

    mode: str
    normalize: bool
    include_prompt: bool = True


def read_pooling(path: Path) -> Pooling | None:
    """The pooling a sentence-transformers directory declares; None when it has no modules.json. InputError for
    a layout compressor does not compute the same way (a Dense layer, two pooling modes, a missing 1_Pooling)."""
    path = Path(path)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    where = "model.path"
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = [m["type"] for m in modules]
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{modules_file} is not a sentence-transformers modules list ({exc})", where=where,
                         hint="save the model with SentenceTransformer.save(DIR)") from None
    unknown = [t for t in types if t not in (TRANSFORMER, POOLING, NORMALIZE)]
    if unknown or types[:1] != [TRANSFORMER] or types.count(POOLING) != 1:
        raise InputError(f"{modules_file} lists {', '.join(t.rpartition('.')[2] for t in types)}; compressor "
                         "compresses Transformer → Pooling (→ Normalize)", where=where,
                         hint="use a model without Dense or other extra modules")
    pooling_dir = path / next(m.get("path", "") for m in modules if m["type"] == POOLING)
    config_file = pooling_dir / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} lists a Pooling module, and {config_file} is missing", where=where,
                         hint="copy the model's 1_Pooling/config.json, or remove modules.json and give model.pooling")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{config_file} is not valid JSON ({exc})", where=where) from None
    modes = [m for m, key in POOLING_KEYS.items() if config.get(key)]
    others = [k for k in OTHER_POOLING_KEYS if config.get(k)]
    if len(modes) != 1 or others:
        raise InputError(f"{config_file} turns on {', '.join(modes + others) or 'no pooling mode'}; compressor "
                         f"computes exactly one of {', '.join(POOLING_KEYS)}", where=where,
                         hint="use a model pooled by mean, CLS or max alone")
    return Pooling(modes[0], NORMALIZE in types, bool(config.get("include_prompt", True)))


def write_pooling(path: Path, pooling: Pooling, dimension: int) -> None:
    """Write the sentence-transformers files for `pooling` into a model directory (beside config.json)."""
    path = Path(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    (path / "1_Pooling").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": dimension, **{key: mode == pooling.mode for mode, key in POOLING_KEYS.items()},
              **{key: False for key in OTHER_POOLING_KEYS}, "include_prompt": pooling.include_prompt}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def pool(tokens: Any, mask: Any, mode: str) -> Any:
    """One vector per row from token vectors (batch, length, width) and the 0/1 attention mask, as
    sentence-transformers' Pooling computes it."""
    import torch

    if mode == "cls":
        return tokens[:, 0]
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    if mode == "max":
        return torch.where(weights > 0, tokens, torch.full_like(tokens, -1e9)).max(1).values
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def cosent_loss(embeddings: Any, scores: Any, scale: float = 20.0) -> Any:
    """CoSENT (Su 2022, sentence-transformers' CoSENTLoss): every pair whose gold score is higher should have the
    higher cosine. `embeddings` holds the first sentences of the N pairs, then the second ones, then any others."""
    import torch

    n = scores.numel()
    if n < 2:
        return embeddings.sum() * 0.0
    a, b = embeddings[:n], embeddings[n : 2 * n]
    cos = torch.nn.functional.cosine_similarity(a, b) * scale
    diff = cos[:, None] - cos[None, :]  # diff[i, j] = cos_i - cos_j, penalized where score_i < score_j
    diff = diff - (1 - (scores[:, None] < scores[None, :]).to(diff.dtype)) * 1e12
    return torch.logsumexp(torch.cat([torch.zeros(1, dtype=diff.dtype), diff.flatten()]), 0)


def cosine_loss(embeddings: Any, scores: Any, top: float = 5.0) -> Any:
    """Squared error between each pair's cosine and its score scaled to 0..1 (sentence-transformers'
    CosineSimilarityLoss on STS-B's 0–5 scores)."""
    import torch

    n = scores.numel()
    if n == 0:
        return embeddings.sum() * 0.0
    cos = torch.nn.functional.cosine_similarity(embeddings[:n], embeddings[n : 2 * n])
    return ((cos - scores / top) ** 2).mean()


class _SentenceEmbeddingMixin:
    """forward() of an encoder with its pooling (set as `self.pooling`) on top; save_pretrained() also writes the
    sentence-transformers files."""

    pooling: Pooling

    def forward(self, input_ids: Any = None, attention_mask: Any = None, token_type_ids: Any = None, labels: Any = None,
                **kwargs: Any) -> Any:
        """The sentence embeddings (normalized if the model normalizes) as `sentence_embedding` and `logits`, the
        token vectors, the encoder's hidden states when asked, and with `labels` (pair scores, see cosent_loss)
        the CoSENT loss."""
        import torch

        kwargs.pop("return_dict", None)
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            # ONNX export feeds the encoder the additive (batch, 1, length, length) mask (compressor.export.encoder):
            # 0 where a key is attended, so its first query row gives the 0/1 mask back for the pooling
            mask = (mask[:, 0, 0, :] == 0).to(torch.int64)
        elif mask is None and input_ids is not None:
            mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,  # type: ignore[misc]
                              **extra, **kwargs)
        tokens = out.last_hidden_state
        embedding = pool(tokens, mask, self.pooling.mode)
        if self.pooling.normalize:
            embedding = torch.nn.functional.normalize(embedding, p=2.0, dim=-1)
        loss = cosent_loss(embedding, labels.to(embedding.dtype)) if labels is not None else None
        return embedding_output(loss=loss, sentence_embedding=embedding, token_embeddings=tokens,
                                hidden_states=out.hidden_states, attentions=out.attentions)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' save_pretrained, then the sentence-transformers files."""
        result = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        write_pooling(Path(save_directory), self.pooling, int(self.config.hidden_size))  # type: ignore[attr-defined]
        return result


_OUTPUT: Any = None
_CLASSES: dict[type, type] = {}


def embedding_output(**values: Any) -> Any:
    """A transformers ModelOutput with `sentence_embedding` (also read as `logits`), `token_embeddings`, and the
    usual `loss`, `hidden_states`, `attentions`."""
    global _OUTPUT
    if _OUTPUT is None:
        from dataclasses import dataclass as _dataclass

        from transformers.utils import ModelOutput

        @_dataclass
        class SentenceEmbeddingOutput(ModelOutput):
            loss: Any = None
            sentence_embedding: Any = None
            token_embeddings: Any = None
            hidden_states: Any = None
            attentions: Any = None

            @property
            def logits(self) -> Any:
                """The sentence embedding: what compressor's code reads as a model's head output."""
                return self.sentence_embedding

        _OUTPUT = SentenceEmbeddingOutput
    return _OUTPUT(**values)


def with_pooling(model: Any, pooling: Pooling) -> Any:
    """`model` (an encoder instance, e.g. BertModel) turned into its sentence-embedding subclass, in place. The
    subclass keeps the encoder's class name, so that config.json's `architectures` stays what
    sentence-transformers and transformers load."""
    base = type(model)
    if isinstance(model, _SentenceEmbeddingMixin):
        base = base.__mro__[2]
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_SentenceEmbeddingMixin, base), {"__module__": __name__,
                                                                     "__qualname__": f"SentenceEmbedding.{base.__name__}"})
        _CLASSES[base] = cls
    model.__class__ = cls
    model.pooling = pooling
    _register_output_capture(model)
    return model


def _register_output_capture(model: Any) -> None:
    """transformers 5 looks up which outputs (hidden states, attentions) a model can record by its class, registered
    in post_init; the class swapped in after it needs the same entry, or `output_hidden_states=True` gives None."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers without output capturing hooks: forward returns hidden states itself
        return
    _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)


#: The pooling of a model built from a config (tests, new models): mean, normalized, as all-MiniLM-L6-v2's.
DEFAULT_POOLING = Pooling("mean", True)


class SentenceEmbeddingModel:
    """What the sentence-embedding task gives as its "Auto class": transformers' AutoModel with the directory's
    sentence-transformers pooling on top."""

    @classmethod
    def from_pretrained(cls, path: Any, *args: Any, **kwargs: Any) -> Any:
        """AutoModel.from_pretrained, with the pooling of the directory's modules.json (InputError without one)."""
        from transformers import AutoModel

        pooling = read_pooling(Path(path))
        if pooling is None:
            raise InputError(f"{path} has no sentence-transformers modules.json, so its pooling is unknown",
                             where="model.path", hint="give model.pooling (mean, cls or max) in the recipe")
        return with_pooling(AutoModel.from_pretrained(str(path), *args, **kwargs), pooling)

    @classmethod
    def from_config(cls, config: Any, pooling: Pooling = DEFAULT_POOLING, **kwargs: Any) -> Any:
        """AutoModel.from_config with `pooling` (mean and normalized by default)."""
        from transformers import AutoModel

        return with_pooling(AutoModel.from_config(config, **kwargs), pooling)
