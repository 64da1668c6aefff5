"""The task contract: what compressor needs to know about one kind of model and its data.

A task is registered by a plugin through the `register_tasks` hook, like steps and evaluators. Core
code asks the task of an artifact (`task_for(artifact.task)`) instead of comparing task names: the
Auto class to load, what a PEFT adapter and the ONNX exporter call it, how a batch is tokenized and
collated, its metrics and which way each is better, and what a bundle verifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple


@dataclass(frozen=True)
class Metric:
    """A metric a task reports, and which way is better."""

    name: str
    higher_is_better: bool = True
    #: The metric's largest value (1 for a fraction such as accuracy, 100 for a ×100 score), which bounds how far
    #: it can drop; None: unbounded (perplexity).
    top: float | None = None

    def gain(self, before: float, after: float) -> float:
        """How much better `after` is than `before` (negative: worse), whatever the direction."""
        return after - before if self.higher_is_better else before - after


class DistillPairs(NamedTuple):
    """What distillation compares in one batch: the rows of logits the KL term reads (student, teacher) and
    the rows of student logits with the label ids the hard cross-entropy reads."""

    soft_student: Any
    soft_teacher: Any
    hard_student: Any
    hard_labels: Any


class Task:
    """Base class of a task. Subclasses set the class attributes and override what differs."""

    #: The name recipes use in `model.task`.
    name: ClassVar[str]
    #: One line for `compressor plugins` and error messages.
    summary: ClassVar[str] = ""
    #: The transformers Auto class that loads a model with this task's head.
    auto_class: ClassVar[str]
    #: Architectures whose name ends with this carry the task's head (e.g. "ForSequenceClassification").
    head_suffix: ClassVar[str]
    #: peft's TaskType member for adapters on this task.
    peft_task_type: ClassVar[str]
    #: The ONNX layout of this task's export, by the name Optimum's exporter gives it (the ORTModel class that
    #: reads it): `text-generation-with-past` marks a decoder with a KV cache.
    export_task: ClassVar[str]
    #: The metrics the evaluator reports; the first is the one guards, sweeps and reports compare.
    metrics: ClassVar[tuple[Metric, ...]]
    #: Whether each data row carries a label (a class, or one tag per word).
    needs_labels: ClassVar[bool] = True
    #: Whether a row's text is a list of words (labels per word) rather than a string.
    word_level: ClassVar[bool] = False
    #: Inputs a model of this task may take, in the order they are fed.
    model_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
    #: Inputs a bundle computes golden outputs for when the recipe's data gives none.
    golden_inputs: ClassVar[tuple[Any, ...]] = ()
    #: The module (numpy, onnxruntime and tokenizers only) whose `Answers` turns a bundle's model outputs into
    #: answers on the device; copied into every bundle of the task (compressor.bundle.device.runtime.LogitAnswers
    #: is the base of answers read from one forward pass).
    device_module: ClassVar[str] = "compressor.tasks.device.labels"
    #: How the report's reproducibility section describes the latency figures (None: the model call on eval rows).
    timing_description: ClassVar[str | None] = None
    #: The `positions` settings distill accepts, the default first; empty: the task's targets only (one per
    #: sentence, one per tagged word), and distill refuses the setting.
    distill_positions: ClassVar[tuple[str, ...]] = ()

    #: The pydantic model of keys this task adds to the recipe's `model:` section (None: it adds none).
    ModelOptions: ClassVar[Any] = None
    #: The output of an exported encoder graph (Optimum's name for it: `logits` for a head).
    output_name: ClassVar[str] = "logits"
    #: The losses finetune's `loss` setting may name, the default first; empty: the model's own loss only.
    train_losses: ClassVar[tuple[str, ...]] = ()

    def prepare_model(self, path: Path, options: Any, cache_dir: Path, log: Callable[[str], None]) -> Path:
        """The recipe's model directory as this task's steps read it, given the validated `model:` options
        (None without ModelOptions): `path` itself by default. A task that needs files the directory lacks
        writes a completed copy under `cache_dir` (never into `path`), or raises InputError saying what is
        missing. Called at `check`."""
        return path

    def check_rows(self, rows: list[Any], path: Path | None, where: str) -> None:
        """Raise compressor.errors.InputError (naming the file, line and column) for a row of one split that
        this task cannot use; every row is fine by default."""

    def train_loss(self, name: str | None) -> Callable[[Any, dict], Any] | None:
        """finetune's loss(model, batch) for `loss: name` (None: the default); None: the model's own loss."""
        return None

    def distill_loss(self, student_logits: Any, teacher_logits: Any, labels: Any, attention_mask: Any) -> Any:
        """distill's output term, when this task replaces the KL + hard-label mix (sentence embeddings: MSE of
        the embeddings); None (the default) keeps the mix over `distill_pairs`."""
        return None

    def answers_module(self) -> str:
        """The device module a bundle of this task carries: `device_module`, or for a task written against plugin
        API 1.1, the module that reads its `bundle_output` (label, entities, generate), with a warning."""
        legacy = getattr(self, "bundle_output", None)
        if legacy is None:
            return self.device_module
        import warnings

        from compressor.bundle.device.runtime import LEGACY_OUTPUT

        warnings.warn(f"task {self.name!r} sets bundle_output, which plugin API 1.2 replaced by device_module; "
                      "bundle_output goes in the next release", DeprecationWarning, stacklevel=2)
        return LEGACY_OUTPUT[legacy]

    def report_sections(self, record: dict[str, Any]) -> list[str]:
        """Markdown lines this task adds to the run's report after the artifacts table (report.html shows them
        too), from record.json; none by default."""
        return []

    def bundle_files(self, artifact: Any) -> dict[str, Any]:
        """Files a bundle of this task carries beside the model, tokenizer, predict.py and the device module
        (name in the bundle → path); none by default."""
        return {}

    def bundle_manifest(self, artifact: Any) -> dict[str, Any]:
        """Keys this task adds to a bundle's manifest.json for its device module; none by default."""
        return {}

    @property
    def metric(self) -> Metric:
        """The primary metric."""
        return self.metrics[0]

    def metric_named(self, name: str) -> Metric:
        """The metric called `name` (an unknown name is taken as higher-is-better)."""
        return next((m for m in self.metrics if m.name == name), Metric(name))

    def has_head(self, architectures: list[str]) -> bool:
        """Whether a config's `architectures` already carry this task's head."""
        return any(a.endswith(self.head_suffix) for a in architectures)

    def model_class(self) -> Any:
        """The transformers Auto class (imported on first use)."""
        import transformers

        return getattr(transformers, self.auto_class)

    def encode(self, tokenizer: Any, texts: list[Any], max_length: int, tensors: str = "np",
               padding: bool | str = True) -> Any:
        """Tokenize a batch of row texts, truncated to `max_length`."""
        return tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length,
                         is_split_into_words=self.word_level, return_tensors=tensors)

    def collate(self, tokenizer: Any, rows: list[Any], label_map: dict[str, int], max_length: int) -> dict:
        """A training batch as torch tensors with `labels`."""
        raise NotImplementedError

    def predictions(self, encoded: Any, logits: Any, labels: list[str], texts: list[Any]) -> list[Any]:
        """What the model predicts for each row of one batch, from its logits."""
        raise NotImplementedError

    def score(self, rows: list[Any], predictions: list[Any], labels: list[str]) -> dict[str, float]:
        """The task's metrics for predictions of every row."""
        raise NotImplementedError

    def parity(self, reference: Any, candidate: Any, texts: list[Any], threads: int) -> dict[str, Any] | None:
        """How far a converted model (`candidate`) is from `reference` on real inputs: `max_abs_diff` of the
        logits, and `problem` (a sentence) when something other than the size of a difference is wrong.
        None (the default) asks for the plain comparison, the largest |logit difference| over the texts
        (`compressor.models.loading.logits_parity`); a task overrides this when logits alone cannot tell."""
        return None

    def distill_targets(self, student_logits: Any, teacher_logits: Any, labels: Any) -> tuple[Any, Any, Any]:
        """The (student, teacher, label) rows that distillation compares: one per sequence by default."""
        return student_logits, teacher_logits, labels

    def distill_pairs(self, student_logits: Any, teacher_logits: Any, labels: Any, attention_mask: Any,
                      positions: str | None = None) -> DistillPairs:
        """The rows the KL term and the hard loss read; by default both are `distill_targets`' rows."""
        s, t, y = self.distill_targets(student_logits, teacher_logits, labels)
        return DistillPairs(s, t, s, y)

    def evaluate_in_memory(self, model: Any, tokenizer: Any, rows: list[Any], labels: list[str],
                           max_length: int) -> float:
        """The primary metric of an in-memory PyTorch model (in eval mode) on `rows`."""
        import torch

        predictions: list[Any] = []
        with torch.inference_mode():
            for i in range(0, len(rows), 64):
                texts = [r.text for r in rows[i : i + 64]]
                enc = self.encode(tokenizer, texts, max_length, tensors="pt")
                predictions += self.predictions(enc, model(**enc).logits.numpy(), labels, texts)
        return self.score(rows, predictions, labels)[self.metric.name]
