#!/usr/bin/env python3
"""Run and verify a compressor bundle with numpy, onnxruntime and tokenizers only.

This file is copied into every bundle as `predict.py`; `compressor verify` and `compressor
predict` import it too, so the device and the host run the same code.

    python predict.py "a gripping film ."          # labels and scores (entities for NER)
    python predict.py "What is the capital of France?"   # a generation bundle streams its answer
    python predict.py "A man plays a guitar." "A man is playing music."   # embeddings: shape and cosine
    python predict.py --verify                      # manifest, checksums, model, golden outputs
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

#: 2: `input` (text | words) and `output` say how to feed and read the model, so that this reader needs no
#: list of task names; 3: `output` names the task's answers module, a file of the bundle
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
#: Schema 2 named the answer's shape in `output`; these are the modules that now read each.
LEGACY_OUTPUT = {"label": "compressor.tasks.device.labels", "entities": "compressor.tasks.device.entities",
                 "generate": "compressor.tasks.device.generation"}
REQUIRED_KEYS = {"schema_version": int, "task": str, "labels": list, "model": dict, "tokenizer": dict,
                 "files": dict, "golden": list, "min_onnxruntime": str, "input": str, "output": str}


#: Overrides the detected int8 kernel class: for an emulator, whose /proc/cpuinfo describes the host.
CLASS_ENV = "COMPRESSOR_CPU_CLASS"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo `flags` or `Features`; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _darwin_feature(name: str) -> bool:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return out.strip() == "1"


def int8_kernel_class() -> str:
    """The class of int8 kernels onnxruntime runs on this CPU: `x86-avx2`, `x86-avx512` (both saturate
    uint8 × int8 pair sums at 16 bits), `x86-avxvnni`, `x86-avx512vnni`, `x86-amx`, `x86-sse`, `arm64`,
    `arm64-dotprod`, `arm64-i8mm`. Int8 outputs can differ between classes."""
    override = os.environ.get(CLASS_ENV)
    if override:
        return override
    machine = platform.machine().lower()
    flags = cpu_flags()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        for flag, name in (("amx_int8", "x86-amx"), ("avx512_vnni", "x86-avx512vnni"),
                           ("avx512vnni", "x86-avx512vnni"), ("avx_vnni", "x86-avxvnni"),
                           ("avx512bw", "x86-avx512"), ("avx2", "x86-avx2")):
            if flag in flags:
                return name
        return "x86-sse" if flags else "x86"
    if machine in ("aarch64", "arm64"):
        if platform.system() == "Darwin":
            return "arm64-i8mm" if _darwin_feature("hw.optional.arm.FEAT_I8MM") else "arm64-dotprod"
        if "i8mm" in flags:
            return "arm64-i8mm"
        return "arm64-dotprod" if "asimddp" in flags else "arm64"
    return machine or "unknown"


#: Classes whose uint8 × int8 kernels saturate pairs of products at 16 bits (vpmaddubsw).
SATURATING_CLASSES = {"x86-avx2", "x86-avx512"}


class BundleError(Exception):
    """A bundle that is incomplete, altered, or does not give its expected outputs."""


def sha256(path: Path) -> str:
    """sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json, checked against the schema this code understands."""
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{MANIFEST}: missing in {root}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{MANIFEST}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST}: not a JSON object")
    version = manifest.get("schema_version")
    if version == 2 and manifest.get("output") in LEGACY_OUTPUT:  # a bundle written before the answers modules, read on the host
        manifest.update(schema_version=SCHEMA_VERSION, output_module=LEGACY_OUTPUT[manifest["output"]])
        version = SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        raise BundleError(f"{MANIFEST}: unknown schema_version {version!r} (this reader knows {SCHEMA_VERSION})")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"{MANIFEST}: field {key!r} is missing or not a {kind.__name__}")
    return manifest


def check_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its size and sha256; no file that is not listed."""
    listed = manifest["files"]
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(set(listed) - present):
        raise BundleError(f"{name}: listed in the manifest but missing")
    for name in sorted(present - set(listed)):
        raise BundleError(f"{name}: not listed in the manifest (an extra file)")
    for name, entry in sorted(listed.items()):
        path = root / name
        if path.stat().st_size != entry.get("size"):
            raise BundleError(f"{name}: size {path.stat().st_size} differs from the manifest's {entry.get('size')}")
        if sha256(path) != entry.get("sha256"):
            raise BundleError(f"{name}: sha256 differs from the manifest (the file was changed)")


def softmax(logits: Any) -> Any:
    """Probabilities over the last axis."""
    import numpy as np

    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def _module_name(manifest: dict[str, Any]) -> str:
    """The answers module the manifest names (`output`), refused unless it is a plain module listed in `files`."""
    name = manifest["output"]
    if not name.isidentifier() or f"{name}.py" not in manifest["files"]:
        raise BundleError(f"{MANIFEST}: output {name!r} names no module file of the bundle")
    return name


def answers_class(manifest: dict[str, Any], root: Path) -> Any:
    """The `Answers` class of the task's answers module, as the manifest names it: inside compressor the
    installed module (`output_module`: no code from a bundle runs on the host), on a device the bundle's copy."""
    import importlib

    if __package__:  # imported from the compressor package: the host
        installed = manifest.get("output_module") or ""
        try:
            return importlib.import_module(installed).Answers
        except ImportError:
            raise BundleError(f"{MANIFEST}: the task's answers module {installed!r} is not installed here; install "
                              "the plugin that made the bundle, or run the bundle's own predict.py") from None
    name = _module_name(manifest)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    sys.modules.setdefault("predict", sys.modules[__name__])  # the copied modules import this runtime as `predict`
    return importlib.import_module(name).Answers


class Predictor:
    """The bundle's model and tokenizer, ready to run; `answers` (the task's module) reads the outputs."""

    def __init__(self, root: Path, manifest: dict[str, Any] | None = None, threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.root = Path(root)
        self.manifest = manifest or read_manifest(self.root)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.model_file = self.root / self.manifest["model"]["file"]
        try:
            # disabled_optimizers: fusions the model was measured faster without (optimize-onnx)
            self.session = ort.InferenceSession(str(self.model_file), options, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=self.manifest["model"].get("disabled_optimizers"))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{self.model_file.name}: onnxruntime cannot load it "
                              f"({str(exc).splitlines()[0]})") from None
        declared = [i["name"] for i in self.manifest["model"].get("inputs", [])]
        actual = [i.name for i in self.session.get_inputs()]
        if declared and declared != actual:
            raise BundleError(f"{self.model_file.name}: inputs {actual} differ from the manifest's {declared}")
        self.tokenizer = Tokenizer.from_file(str(self.root / self.manifest["tokenizer"]["file"]))
        self.words = self.manifest["input"] == "words"
        self.answers = answers_class(self.manifest, self.root)(self)

    def encode(self, texts: list[Any]) -> tuple[dict[str, Any], list[Any]]:
        """Feeds for the session, and the encodings (for word alignment)."""
        import numpy as np

        if self.words:
            items = [t.split() if isinstance(t, str) else list(t) for t in texts]
            encodings = self.tokenizer.encode_batch(items, is_pretokenized=True)
        else:
            encodings = self.tokenizer.encode_batch(list(texts))
        columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
                   "token_type_ids": [e.type_ids for e in encodings]}
        feeds = {i.name: np.asarray(columns[i.name], dtype=np.int64) for i in self.session.get_inputs()}
        return feeds, encodings

    def logits(self, texts: list[Any]) -> Any:
        """Raw logits for a batch."""
        feeds, _ = self.encode(texts)
        return self.session.run(None, feeds)[0]

    def predict(self, texts: list[Any]) -> list[Any]:
        """One answer per text, in the task's shape (a label and score, entities, a generated text)."""
        return self.answers.predict(list(texts))

    @property
    def streams(self) -> bool:
        """Whether answers come piece by piece (`stream(text)`), as a generator's do."""
        return hasattr(self.answers, "stream")

    def stream(self, text: str, max_new_tokens: int | None = None) -> Any:
        """The answer to one prompt as text pieces (for a task whose answers stream)."""
        return self.answers.stream(text, max_new_tokens)


class LogitAnswers:
    """The base of answers read from one forward pass (classifiers, taggers): rows padded and truncated as
    the manifest says; golden outputs are the logits, compared within a tolerance. Subclasses `decode`."""

    golden_kind = "logits"

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        spec = predictor.manifest["tokenizer"]
        predictor.tokenizer.enable_truncation(spec.get("max_length", 128))
        predictor.tokenizer.enable_padding(pad_id=spec.get("pad_id", 0), pad_token=spec.get("pad_token", "[PAD]"))

    @classmethod
    def routes(cls, app: Any, server: Any) -> None:
        """What a server (serve.py) adds for this task: POST /predict, micro-batched across clients."""
        server.add_predict_route(app)

    def decode(self, texts: list[Any], encodings: list[Any], logits: Any) -> list[Any]:
        """The answers for one batch, from its logits."""
        raise NotImplementedError

    def predict(self, texts: list[Any]) -> list[Any]:
        """One answer per text (one forward pass for the batch)."""
        feeds, encodings = self.predictor.encode(texts)
        return self.decode(texts, encodings, self.predictor.session.run(None, feeds)[0])

    def golden(self, inputs: list[Any], new_tokens: int) -> list[dict[str, Any]]:
        """What verify compares: the logits of each input, run alone."""
        return [{"input": text, "logits": self.predictor.logits([text])[0].tolist()} for text in inputs]

    def check(self, i: int, case: dict[str, Any], tolerance: float, here: str, golden_on: str | None) -> float:
        """The largest |logit difference| from golden case `i`; BundleError beyond `tolerance`."""
        import numpy as np

        got = self.predictor.logits([case["input"]])[0]
        expected = np.asarray(case["logits"], dtype=np.float32)
        if got.shape != expected.shape:
            raise BundleError(f"golden[{i}]: output shape {got.shape} differs from the expected {expected.shape}")
        diff = float(np.abs(got - expected).max())
        if diff > tolerance:
            raise BundleError(f"golden[{i}]: outputs differ from the expected by {diff:.3g} (tolerance {tolerance})"
                              f" for input {case['input']!r}{_class_note(here, golden_on)}")
        return diff


def _class_note(here: str, golden_on: str | None) -> str:
    """Why outputs may differ on this CPU when the golden ones were made on another int8 kernel class."""
    if not golden_on or golden_on == here:
        return ""
    saturating = ({here, golden_on} & SATURATING_CLASSES) and not {here, golden_on} <= SATURATING_CLASSES
    return (f" on this CPU's {here} int8 kernels, beyond what was measured between CPU classes; the golden "
            f"outputs were computed with {golden_on} kernels"
            + (" (x86 CPUs without VNNI sum pairs of uint8 × int8 products in 16 bits, which saturates)"
               if saturating else "")
            + f", so this model's accuracy on {here} CPUs is unmeasured: run the recipe on such a CPU "
              "(quantize-onnx mode: auto measures its settings there)")


def verify(root: Path) -> dict[str, Any]:
    """Schema, checksums, loading, golden outputs; raises BundleError naming what is wrong.

    Integer kernels differ between CPU classes (int8_kernel_class): on a class other than the one
    the golden outputs were computed on, the manifest's `tolerance_other_class` applies, and the
    result says so."""
    root = Path(root)
    manifest = read_manifest(root)
    check_files(root, manifest)
    return {"files": len(manifest["files"]), **check_golden(Predictor(root, manifest))}


def check_golden(predictor: Predictor) -> dict[str, Any]:
    """Every golden input of the predictor's manifest against its golden output, within the tolerance for this
    CPU's int8 kernel class (BundleError on a difference); what was compared and on which classes."""
    manifest = predictor.manifest
    here = int8_kernel_class()
    golden_on = (manifest.get("golden_on") or {}).get("int8_kernels")
    other = bool(golden_on) and golden_on != here
    tolerance = manifest.get("tolerance_other_class", manifest.get("tolerance", 1e-3)) if other \
        else manifest.get("tolerance", 1e-3)
    worst = 0.0
    for i, case in enumerate(manifest["golden"]):
        worst = max(worst, predictor.answers.check(i, case, tolerance, here, golden_on))
    return {"golden": len(manifest["golden"]), "max_abs_diff": worst,
            "tokens": predictor.answers.golden_kind == "tokens",
            "tolerance": tolerance, "cpu_class": here, "golden_on": golden_on, "other_class": other,
            "measured_on": (manifest.get("measured_on") or {}).get("int8_kernels"),
            "tuned_on": (manifest.get("tuned_on") or {}).get("int8_kernels")}


def describe_verdict(result: dict[str, Any]) -> str:
    """verify()'s result as the lines `predict.py --verify` and `compressor verify` print."""
    lines = [f"ok: {result['files']} files match their checksums, "
             + (f"{result['golden']} golden prompts give the same greedy tokens" if result.get("tokens") else
                f"{result['golden']} golden outputs within tolerance {result['tolerance']:g} "
                f"(max difference {result['max_abs_diff']:.2g})")]
    if result["other_class"]:
        lines.append(f"note: this CPU runs {result['cpu_class']} int8 kernels; the golden outputs were computed with "
                     f"{result['golden_on']} kernels, so the tolerance between CPU classes applied")
    for key, what in (("measured_on", "the manifest's metrics were measured"), ("tuned_on", "quantization was tuned")):
        if result.get(key) and result[key] != result["cpu_class"]:
            lines.append(f"note: {what} on {result[key]} int8 kernels, not this CPU's {result['cpu_class']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Command line: TEXT… to predict, --verify to check the bundle."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="*", help="Texts to classify (for NER: words separated by spaces).")
    parser.add_argument("--verify", action="store_true", help="Check the manifest, checksums and golden outputs.")
    parser.add_argument("--bundle", default=str(Path(__file__).resolve().parent), help="Bundle directory.")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            print(describe_verdict(verify(Path(args.bundle))))
            return 0
        if not args.texts:
            parser.error("give texts to predict, or --verify")
        predictor = Predictor(Path(args.bundle))
        if predictor.streams:  # stream the answer as it is generated
            for text in args.texts:
                for piece in predictor.stream(text):
                    print(piece, end="", flush=True)
                print()
            return 0
        if hasattr(predictor.answers, "summary"):  # a task that answers about the texts together (embeddings)
            print(predictor.answers.summary(args.texts))
            return 0
        for text, result in zip(args.texts, predictor.predict(args.texts)):
            print(json.dumps({"text": text, "prediction": result}, ensure_ascii=False))
        return 0
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
