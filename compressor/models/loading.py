"""Loading an artifact for inference: PyTorch for `hf`, ONNX Runtime for `onnx`.

A runner takes a batch of tokenized numpy inputs and returns logits as numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from compressor.models.artifact import Artifact
from compressor.models.formats import HF, format_named
from compressor.errors import InputError

class LoadedModel:
    """A loaded model plus its tokenizer: `encode(texts)` then `__call__(batch)` → logits."""

    def __init__(self, artifact: Artifact, tokenizer: Any, forward: Callable[[dict[str, np.ndarray]], np.ndarray],
                 input_names: list[str]):
        self.artifact = artifact
        self.tokenizer = tokenizer
        self.forward = forward
        self.input_names = input_names

    def encode(self, texts: list[Any]) -> Any:
        """Tokenize a batch the way the artifact's task does (word lists for a word tagger), padded, as numpy."""
        from compressor.tasks import task_for

        return task_for(self.artifact.task).encode(self.tokenizer, texts, self.artifact.max_length)

    def __call__(self, batch: Any) -> np.ndarray:
        """Logits for one encoded batch."""
        return self.forward({k: np.asarray(batch[k]) for k in self.input_names if k in batch})


def load_tokenizer(path: Path) -> Any:
    """The artifact's tokenizer (fast, so that word alignment works)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer in {path}: {exc}", where=str(path)) from None


def load_plugin_model(path: Path, task: str) -> Any | None:
    """The model a plugin's `load_hf_model` hook rebuilds from this directory, or None if no plugin claims it."""
    import json

    from compressor.host import current_host

    config = json.loads((Path(path) / "config.json").read_text())
    return current_host().pm.hook.load_hf_model(path=str(path), task=task, config=config)


def load_torch_model(path: Path, task: str, adapter: str | None = None) -> Any:
    """A transformers model from safetensors only (never a pickle), with an unmerged peft adapter if named."""
    from compressor.tasks import task_for

    model = load_plugin_model(path, task)
    if model is None:
        model = task_for(task).model_class().from_pretrained(str(path), use_safetensors=True)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(path) / adapter))
    return model.eval()


def logits_parity(reference: Artifact, candidate: Artifact, texts: list[Any], threads: int) -> dict[str, Any]:
    """The largest |logit difference| between two artifacts of one task over `texts`, in batches of 8."""
    ref, cand = load_runner(reference, threads), load_runner(candidate, threads)
    worst = 0.0
    for i in range(0, len(texts), 8):
        enc = ref.encode(texts[i : i + 8])
        worst = max(worst, float(np.abs(ref(enc) - cand(enc)).max()))
    return {"max_abs_diff": worst, "problem": None}


def load_runner(artifact: Artifact, threads: int) -> LoadedModel:
    """A runner on the runtime the artifact targets."""
    tokenizer = load_tokenizer(artifact.path)
    if artifact.format == HF:
        import torch

        torch.set_num_threads(threads)
        model = load_torch_model(artifact.path, artifact.task, artifact.info.adapter)
        from compressor.tasks import task_for

        names = list(task_for(artifact.task).model_inputs)

        def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

        return LoadedModel(artifact, tokenizer, forward, names)
    if format_named(artifact.format).onnxruntime:
        session = ort_session(artifact.model_file, threads, artifact.info.disabled_optimizers or ())
        names = [i.name for i in session.get_inputs()]

        def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
            return session.run(None, {k: v.astype(np.int64) for k, v in batch.items()})[0]

        return LoadedModel(artifact, tokenizer, forward, names)
    from compressor.host import current_host

    found = current_host().pm.hook.load_forward(artifact=artifact, threads=threads)
    if found is not None:
        forward, names = found
        return LoadedModel(artifact, tokenizer, forward, list(names))
    raise InputError(f"no runtime for format {artifact.format!r} here", where=str(artifact.path))


def ort_session(model_file: Path, threads: int, disabled_optimizers: tuple[str, ...] | list[str] = ()) -> Any:
    """An ONNX Runtime CPU session with full graph optimisations (less `disabled_optimizers`) and a fixed
    thread count."""
    return ort_session_from(str(model_file), threads, disabled_optimizers)


def ort_session_from(model: str | bytes, threads: int, disabled_optimizers: tuple[str, ...] | list[str] = ()) -> Any:
    """ort_session for a model file path or serialized model bytes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))
