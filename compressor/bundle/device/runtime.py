#!/usr/bin/env python3
"""Run and verify a compressor bundle with numpy, onnxruntime and tokenizers only.

This file is copied into every bundle as `predict.py`; `compressor verify` and `compressor
predict` import it too, so the device and the host run the same code.

    python predict.py "a gripping film ."          # labels and scores (entities for NER)
    python predict.py "What is the capital of France?"   # a generation bundle streams its answer
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

#: 2: `input` (text | words) and `output` (label | entities) say how to feed and read the model, so that
#: this reader needs no list of task names
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
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


class Predictor:
    """The bundle's model and tokenizer, ready to run."""

    def __init__(self, root: Path, manifest: dict[str, Any] | None = None, threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.root = Path(root)
        self.manifest = manifest or read_manifest(self.root)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        model_file = self.root / self.manifest["model"]["file"]
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{model_file.name}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        declared = [i["name"] for i in self.manifest["model"].get("inputs", [])]
        actual = [i.name for i in self.session.get_inputs()]
        if declared and declared != actual:
            raise BundleError(f"{model_file.name}: inputs {actual} differ from the manifest's {declared}")
        spec = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer.from_file(str(self.root / spec["file"]))
        self.words = self.manifest["input"] == "words"
        self.lm = None
        if self.manifest["output"] == "generate":  # a causal LM: prompts in, greedy tokens out, no padding
            try:
                from compressor.bundle.device.generation_runtime import OnnxCausalLM
            except ImportError:  # on the device: the copy beside this file
                sys.path.insert(0, str(self.root))
                from generation_runtime import OnnxCausalLM
            self.lm = OnnxCausalLM(model_file, session=self.session)
            self.generation = self.manifest["generation"]
            return
        self.tokenizer.enable_truncation(spec.get("max_length", 128))
        self.tokenizer.enable_padding(pad_id=spec.get("pad_id", 0), pad_token=spec.get("pad_token", "[PAD]"))

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

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt as the model was trained to read it (in the chat template, when it has one)."""
        text = self.generation["prompt_format"].format(prompt=prompt)
        return self.tokenizer.encode(text, add_special_tokens=self.generation["add_special_tokens"]).ids

    def _greedy(self, prompt: str, max_new_tokens: int | None) -> Any:
        """The greedy answer's token ids, one at a time, until a stop token or the limit."""
        return self.lm.stream(self.prompt_ids(prompt), max_new_tokens or self.generation["max_new_tokens"],
                              set(self.generation["stop_ids"]))

    def tokens(self, prompt: str, max_new_tokens: int | None = None) -> list[int]:
        """The greedy answer's token ids."""
        return list(self._greedy(prompt, max_new_tokens))

    def stream(self, prompt: str, max_new_tokens: int | None = None) -> Any:
        """The greedy answer as text pieces, one per generated token (decoded so far, minus what was given)."""
        ids: list[int] = []
        shown = ""
        for token in self._greedy(prompt, max_new_tokens):
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text

    def predict(self, texts: list[Any]) -> list[Any]:
        """Per text: {label, score}; for token classification, a list of entities; for a generator, {text}."""
        import numpy as np

        if self.lm is not None:
            return [{"text": "".join(self.stream(t))} for t in texts]

        feeds, encodings = self.encode(texts)
        logits = self.session.run(None, feeds)[0]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        labels = self.manifest["labels"]
        if self.manifest["output"] == "label":
            return [{"label": labels[int(p.argmax())], "score": float(p.max())} for p in probs]
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


def verify(root: Path) -> dict[str, Any]:
    """Schema, checksums, loading, golden outputs; raises BundleError naming what is wrong.

    Integer kernels differ between CPU classes (int8_kernel_class): on a class other than the one
    the golden outputs were computed on, the manifest's `tolerance_other_class` applies, and the
    result says so."""
    import numpy as np

    root = Path(root)
    manifest = read_manifest(root)
    check_files(root, manifest)
    predictor = Predictor(root, manifest)
    here = int8_kernel_class()
    golden_on = (manifest.get("golden_on") or {}).get("int8_kernels")
    other = bool(golden_on) and golden_on != here
    tolerance = manifest.get("tolerance_other_class", manifest.get("tolerance", 1e-3)) if other \
        else manifest.get("tolerance", 1e-3)
    worst = 0.0
    for i, case in enumerate(manifest["golden"]):
        if "tokens" in case:  # a generator: the same greedy tokens
            got_tokens = predictor.tokens(case["input"], len(case["tokens"]) or 1)
            if got_tokens != case["tokens"][: len(got_tokens)] or len(got_tokens) < len(case["tokens"]):
                at = next((k for k, (a, b) in enumerate(zip(got_tokens, case["tokens"])) if a != b),
                          min(len(got_tokens), len(case["tokens"])))
                where = (f" (this CPU runs {here} int8 kernels, the golden tokens were made with {golden_on} "
                         "kernels: integer rounding differs between CPU classes)" if other else "")
                raise BundleError(f"golden[{i}]: greedy tokens differ from token {at} on for input "
                                  f"{case['input']!r}: {predictor.tokenizer.decode(got_tokens)!r} instead of "
                                  f"{predictor.tokenizer.decode(case['tokens'])!r}{where}")
            continue
        got = predictor.logits([case["input"]])[0]
        expected = np.asarray(case["logits"], dtype=np.float32)
        if got.shape != expected.shape:
            raise BundleError(f"golden[{i}]: output shape {got.shape} differs from the expected {expected.shape}")
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if diff > tolerance:
            saturating = ({here, golden_on} & SATURATING_CLASSES) and not {here, golden_on} <= SATURATING_CLASSES
            where = (f" on this CPU's {here} int8 kernels, beyond what was measured between CPU classes; the golden "
                     f"outputs were computed with {golden_on} kernels"
                     + (" (x86 CPUs without VNNI sum pairs of uint8 × int8 products in 16 bits, which saturates)"
                        if saturating else "")
                     + f", so this model's accuracy on {here} CPUs is unmeasured: run the recipe on such a CPU "
                       "(quantize-onnx mode: auto measures its settings there)" if other else "")
            raise BundleError(f"golden[{i}]: outputs differ from the expected by {diff:.3g} (tolerance {tolerance})"
                              f" for input {case['input']!r}{where}")
    return {"files": len(manifest["files"]), "golden": len(manifest["golden"]), "max_abs_diff": worst,
            "tokens": any("tokens" in case for case in manifest["golden"]),
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
        if predictor.lm is not None:  # stream the answer as it is generated
            for text in args.texts:
                for piece in predictor.stream(text):
                    print(piece, end="", flush=True)
                print()
            return 0
        for text, result in zip(args.texts, predictor.predict(args.texts)):
            print(json.dumps({"text": text, "prediction": result}, ensure_ascii=False))
        return 0
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
