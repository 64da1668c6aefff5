"""`sentence-embedding`: one vector per sentence (all-MiniLM-L6-v2 and other sentence-transformers models), scored
by the STS Spearman correlation (×100) of cosine similarities with gold scores, and by fidelity: the mean cosine
between an artifact's embedding of a sentence and the run's input model's embedding of it (can the compressed
model query an index the original built?).

A plugin module of its own: it registers the task and its evaluator through the public hooks. Rows are pairs of
sentences with a score (data.text names two columns; data.label the score), or single sentences (distill's
text_file). The model is the encoder with its pooling (compressor.tasks.embedding_model); its ONNX export has
pooling and normalization in the graph, with one `sentence_embedding` output.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import InputError, StepError
from compressor.hookspecs import hookimpl
from compressor.models.artifact import Artifact
from compressor.tasks.base import Metric, Task


class EmbeddingModelOptions(BaseModel):
    """What `model:` may add for a sentence-embedding model without sentence-transformers files."""

    model_config = ConfigDict(extra="forbid")

    pooling: Literal["mean", "cls", "max"] | None = Field(default=None, description="How token vectors become "
                                                          "the sentence vector, where the model directory has no "
                                                          "modules.json / 1_Pooling (those win otherwise).")
    normalize: bool = Field(default=True, description="With model.pooling: L2-normalize the sentence vectors.")


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation (Pearson's of the ranks, ties at their mean rank), as scipy.stats.spearmanr."""
    import numpy as np

    def ranks(v: Any) -> Any:
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v), dtype=np.float64)
        r[order] = np.arange(1, len(v) + 1)
        values, inverse = np.unique(v, return_inverse=True)
        sums = np.bincount(inverse, weights=r)
        counts = np.bincount(inverse)
        return (sums / counts)[inverse]

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator else 0.0


def cosines(a: Any, b: Any) -> Any:
    """Row-wise cosine similarity of two (n, width) arrays."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-12)


def sentences_of(texts: list[Any]) -> list[str]:
    """The sentences of rows, in order: both of a pair, or the one of a single sentence."""
    return [s for t in texts for s in (t if isinstance(t, (tuple, list)) else (t,))]


#: The largest |difference| of one element of an int8 model's L2-normalized embedding between int8 kernel classes:
#: bench/cpu_classes.py embeddings measured, against AVX512-VNNI golden outputs of minilm-stsb-int8, at most 0.0315
#: on x86 AVX2 (saturating U8S8) and 0.018 on ARM64 NEON over 404 sentences (docs/results.md, "CPU classes").
#: 0.05 accepts those; a model other than the bundle's differs by more than that (see the tests).
OTHER_CLASS_TOLERANCE = 0.05


class SentenceEmbedding(Task):
    """A sentence encoder with its pooling (BertModel + mean pooling + normalization, as all-MiniLM-L6-v2)."""

    name = "sentence-embedding"
    summary = "one vector per sentence; STS Spearman ×100 and fidelity to the input model"
    auto_class = "AutoModel"
    head_suffix = "Model"
    peft_task_type = "FEATURE_EXTRACTION"
    export_task = "feature-extraction"
    metrics = (Metric("spearman", top=100.0), Metric("fidelity", top=1.0))
    needs_labels = False
    golden_inputs = ("A man is playing a guitar.", "A woman is slicing an onion.",
                     "The cat sits on the mat.", "Stocks fell sharply on Monday.")
    device_module = "compressor.tasks.device.embeddings"
    output_name = "sentence_embedding"
    train_losses = ("cosent", "cosine")
    ModelOptions: ClassVar[Any] = EmbeddingModelOptions
    timing_description = "the model call on single sentences of the eval pairs (batch 1, and batches of 32)"

    def model_class(self) -> Any:
        """AutoModel with the directory's sentence-transformers pooling (compressor.tasks.embedding_model)."""
        from compressor.tasks.embedding_model import SentenceEmbeddingModel

        return SentenceEmbeddingModel

    def has_head(self, architectures: list[str]) -> bool:
        """The pooling is the head, and prepare_model made sure the directory declares one."""
        return True

    def prepare_model(self, path: Path, options: Any, cache_dir: Path, log: Callable[[str], None]) -> Path:
        """The directory itself when its sentence-transformers files give the pooling (and model.pooling, if set,
        agrees); without them, a cached copy with the files model.pooling describes; InputError when neither."""
        from compressor.tasks.embedding_model import Pooling, read_pooling, write_pooling

        path = Path(path)
        if not (path / "config.json").is_file():
            return path  # inspect_model says what is wrong with the directory
        declared = read_pooling(path)
        wanted = Pooling(options.pooling, options.normalize) if options is not None and options.pooling else None
        if declared is not None:
            if wanted is not None and (wanted.mode, wanted.normalize) != (declared.mode, declared.normalize):
                raise InputError(f"model.pooling says {wanted.mode}{' + normalize' * wanted.normalize}, and "
                                 f"{path / 'modules.json'} declares {declared.mode}"
                                 f"{' + normalize' * declared.normalize}", where="model.pooling",
                                 hint="remove model.pooling (the model's own files are used)")
            return path
        if wanted is None:
            raise InputError(f"{path} has no sentence-transformers files (modules.json, 1_Pooling/config.json), so "
                             "how its token vectors become a sentence vector is unknown", where="model.pooling",
                             hint="add model.pooling: mean (or cls, max) to the recipe, and model.normalize: false "
                                  "if the vectors are not L2-normalized")
        import json

        from compressor.models.artifact import hash_dir, link_or_copy_tree

        key = hashlib.sha256(f"{hash_dir(path)}:{wanted}".encode()).hexdigest()[:24]
        target = Path(cache_dir) / "inputs" / f"pooling-{key}"
        if not (target / "modules.json").is_file():
            tmp = target.with_name(target.name + ".tmp")
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy_tree(path, tmp)
            width = int(json.loads((path / "config.json").read_text()).get("hidden_size") or 0)
            write_pooling(tmp, wanted, width)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            log(f"model.pooling: {path} with {wanted.mode} pooling written beside it in {target}")
        return target

    def check_rows(self, rows: list[Any], path: Path | None, where: str) -> None:
        """Every sentence non-empty; every pair's score a number (train rows may also be single sentences)."""
        for number, row in enumerate(rows, 1):
            line = f"line {row.line}" if row.line else f"row {number}"
            texts = row.text if isinstance(row.text, tuple) else (row.text,)
            for k, text in enumerate(texts):
                if not isinstance(text, str) or not text.strip():
                    raise InputError(f"{line} of {path}: sentence {k + 1} (column {k + 1} of data.text) is empty",
                                     where=where, hint="remove the row, or fix the file")
            if isinstance(row.text, tuple):
                try:
                    score = float(row.label)
                except (TypeError, ValueError):
                    score = float("nan")
                if not math.isfinite(score):
                    raise InputError(f"{line} of {path}: the score (data.label) is {row.label!r}, not a number",
                                     where=where, hint="each pair needs a numeric similarity score, e.g. 0 to 5")
            elif where != "data.train":
                raise InputError(f"{line} of {path} is one sentence; {where} needs pairs with a score",
                                 where=where, hint="set data.text to the two sentence columns")

    def bundle_manifest(self, artifact: Any) -> dict[str, Any]:
        """An integer model's tolerance for golden embeddings checked on another int8 kernel class
        (OTHER_CLASS_TOLERANCE); a float model keeps the writer's same-class tolerance."""
        return {"tolerance_other_class": OTHER_CLASS_TOLERANCE} if artifact.info.quantized else {}

    def encode(self, tokenizer: Any, texts: list[Any], max_length: int, tensors: str = "np",
               padding: bool | str = True) -> Any:
        """Tokenize the rows' sentences (both of each pair, in order) as one batch."""
        return tokenizer(sentences_of(list(texts)), padding=padding, truncation=True, max_length=max_length,
                         return_tensors=tensors)

    def collate(self, tokenizer: Any, rows: list[Any], label_map: dict[str, int], max_length: int) -> dict:
        """The first sentences of the scored pairs, then their second ones, then single sentences; `labels` holds
        the pairs' scores (what cosent_loss reads)."""
        import torch

        pairs = [r for r in rows if isinstance(r.text, tuple)]
        singles = [r.text for r in rows if not isinstance(r.text, tuple)]
        texts = [r.text[0] for r in pairs] + [r.text[1] for r in pairs] + singles
        batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        batch["labels"] = torch.tensor([float(r.label) for r in pairs], dtype=torch.float32)
        return batch

    def train_loss(self, name: str | None) -> Callable[[Any, dict], Any]:
        """CoSENT (the default) or the cosine-similarity loss on the batch's scored pairs."""
        from compressor.tasks.embedding_model import cosent_loss, cosine_loss

        fn = cosine_loss if name == "cosine" else cosent_loss

        def loss(model: Any, batch: dict) -> Any:
            if batch["labels"].numel() < 2:
                raise StepError("finetune trains a sentence-embedding model on scored pairs, and a batch has fewer "
                                "than two", hint="give data.text two sentence columns and data.label the score")
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return fn(model(**inputs).sentence_embedding, batch["labels"])

        return loss

    def distill_loss(self, student_logits: Any, teacher_logits: Any, labels: Any, attention_mask: Any) -> Any:
        """Squared distance between the student's and the teacher's L2-normalized sentence embeddings, summed over
        the width and averaged over sentences (= 2·(1 − cosine)): what fidelity measures."""
        import torch.nn.functional as F

        s, t = F.normalize(student_logits, dim=-1), F.normalize(teacher_logits, dim=-1)
        return ((s - t) ** 2).sum(-1).mean()

    def predictions(self, encoded: Any, logits: Any, labels: list[str], texts: list[Any]) -> list[Any]:
        """The cosine of each pair (a single sentence's row gets None)."""
        out, k = [], 0
        for text in texts:
            if isinstance(text, (tuple, list)):
                out.append(float(cosines(logits[k : k + 1], logits[k + 1 : k + 2])[0]))
                k += 2
            else:
                out.append(None)
                k += 1
        return out

    def score(self, rows: list[Any], predictions: list[Any], labels: list[str]) -> dict[str, float]:
        """Spearman ×100 of the cosines against the gold scores."""
        kept = [(p, float(r.label)) for p, r in zip(predictions, rows) if p is not None]
        return {"spearman": 100 * spearman([p for p, _ in kept], [g for _, g in kept])}

    def evaluate_in_memory(self, model: Any, tokenizer: Any, rows: list[Any], labels: list[str],
                           max_length: int) -> float:
        """STS Spearman ×100 of an in-memory PyTorch model on scored pairs (distill's epoch choice)."""
        import torch

        pairs = [r for r in rows if isinstance(r.text, tuple)]
        predictions: list[Any] = []
        with torch.inference_mode():
            for i in range(0, len(pairs), 64):
                texts = [r.text for r in pairs[i : i + 64]]
                enc = self.encode(tokenizer, texts, max_length, tensors="pt")
                predictions += self.predictions(enc, model(**enc).sentence_embedding.numpy(), labels, texts)
        return self.score(pairs, predictions, labels)["spearman"]


#: The input model's embeddings of the eval sentences, once per run: (source, sentences digest) → array.
_REFERENCE: dict[tuple[str, str], Any] = {}


def embed(runner: Any, sentences: list[str], batch_size: int = 32) -> Any:
    """Sentence embeddings from a compressor.models.loading runner, batched by length (less padding), in order."""
    import numpy as np

    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out: list[Any] = [None] * len(sentences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        vectors = runner(runner.encode([sentences[i] for i in chunk]))
        for i, v in zip(chunk, vectors):
            out[i] = v
    return np.asarray(out, dtype=np.float32)


class EmbeddingEvaluator:
    """STS Spearman ×100 and fidelity to the run's input model on the eval pairs, and latency on single sentences,
    on every format compressor.models.loading runs."""

    task = SentenceEmbedding.name
    formats = ("*",)
    metric = "spearman"
    version = "1"

    def evaluate(self, artifact: Artifact, rows: list[Any], settings: Any) -> dict[str, Any]:
        """Spearman, fidelity (when the run's input is known), pearson, and latency if asked."""
        import numpy as np

        from compressor.evaluate.measure import latency
        from compressor.models.loading import load_runner

        pairs = [r for r in rows if isinstance(r.text, tuple)]
        if not pairs:
            raise InputError("the eval rows hold no sentence pairs to score", where="data.eval",
                             hint="set data.text to the two sentence columns")
        sentences = sorted({s for r in pairs for s in r.text})
        index = {s: i for i, s in enumerate(sentences)}
        runner = load_runner(artifact, settings.threads)
        vectors = embed(runner, sentences)
        a = vectors[[index[r.text[0]] for r in pairs]]
        b = vectors[[index[r.text[1]] for r in pairs]]
        cos, gold = cosines(a, b), np.asarray([float(r.label) for r in pairs])
        result: dict[str, Any] = {"spearman": 100 * spearman(cos, gold),
                                  "pearson": 100 * float(np.corrcoef(cos, gold)[0, 1]), "rows": len(pairs),
                                  "sentences": len(sentences), "dimension": int(vectors.shape[1])}
        reference = self._reference(artifact, settings, sentences)
        if reference is not None:
            result["fidelity"] = float(cosines(vectors, reference).mean())
            result["fidelity_min"] = float(cosines(vectors, reference).min())
        if settings.latency:
            result["latency"] = latency(runner, [s for r in pairs for s in r.text], list(settings.batch_sizes),
                                        settings.runs, settings.warmup)
        return result

    def _reference(self, artifact: Artifact, settings: Any, sentences: list[str]) -> Any:
        """The run's input model's embeddings of `sentences` (computed once per run), or None outside a run."""
        from compressor.models.formats import HF, ONNX, format_named
        from compressor.models.loading import load_runner

        source = getattr(settings, "source", None)
        if not source:
            return None
        key = (source, hashlib.sha256("\n".join(sentences).encode()).hexdigest())
        if key not in _REFERENCE:
            onnx = (Path(source) / format_named(ONNX).model_file).is_file()  # as inspect_model tells the formats
            origin = Artifact(path=Path(source), format=ONNX if onnx else HF, task=artifact.task, labels=[], info={})
            _REFERENCE[key] = embed(load_runner(origin, settings.threads), sentences)
        return _REFERENCE[key]


@hookimpl
def register_tasks(register: Callable[[Any], None]) -> None:
    """The sentence-embedding task."""
    register(SentenceEmbedding())


@hookimpl
def register_evaluators(register: Callable[[Any], None]) -> None:
    """Its evaluator, on every format."""
    register(EmbeddingEvaluator())
