"""Test helpers for compressor and for plugin authors: tiny models built from a config, small
slices of real data, and running a recipe from YAML text.

Registered as a pytest plugin (entry point `pytest11`), so its fixtures are available to any
test suite once compressor is installed.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


DATA_ENV = "COMPRESSOR_SHARED_DATA"


def shared_data_dir() -> Path:
    """The real data (SST-2, CoNLL-2003, WikiText-2): $COMPRESSOR_SHARED_DATA, else a `shared/data` directory
    beside the compressor checkout or beside the current directory or one of its parents."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in [*here.parents, Path.cwd(), *Path.cwd().parents]:
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def bench_module(name: str) -> Any:
    """A script of the source tree's bench/ folder (`bench/NAME.py`) loaded as a module, once per process."""
    import importlib.util
    import sys

    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent.parent / "bench"
                                                      / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def require_data(*relative: str) -> Path:
    """shared_data_dir(), or skip the test saying which files are missing and how to point at them.

    The data is not shipped with compressor: SST-2 and CoNLL-2003 are research data whose terms do not
    allow redistributing them in a package (CoNLL-2003 is Reuters text)."""
    root = shared_data_dir()
    missing = [r for r in relative if not (root / r).is_file()]
    if missing:
        pytest.skip(f"real-data fixture: {', '.join(missing)} not found under {root}; set {DATA_ENV}=DIR to a "
                    "directory holding sst2/train.tsv, sst2/dev.tsv, conll2003/train.txt and conll2003/valid.txt")
    return root


def write_tsv_slice(src: Path, dst: Path, rows: int, skip: int = 0) -> Path:
    """Copy the header and `rows` rows (after `skip`) of a real tsv file."""
    with open(src, encoding="utf-8") as fh, open(dst, "w", encoding="utf-8") as out:
        out.write(fh.readline())
        for i, line in enumerate(fh):
            if i >= skip + rows:
                break
            if i >= skip:
                out.write(line)
    return dst


def write_conll_slice(src: Path, dst: Path, sentences: int) -> Path:
    """Copy the first `sentences` sentences of a real CoNLL file."""
    seen = 0
    with open(src, encoding="utf-8") as fh, open(dst, "w", encoding="utf-8") as out:
        block: list[str] = []
        for line in fh:
            if line.strip():
                block.append(line)
                continue
            if block and not block[0].startswith("-DOCSTART-"):
                out.writelines(block + ["\n"])
                seen += 1
                if seen >= sentences:
                    break
            block = []
    return dst


def build_tokenizer(words: list[str], out_dir: Path, lowercase: bool, size: int = 3000) -> Any:
    """A BERT WordPiece tokenizer whose vocabulary is the most frequent words plus single characters."""
    from transformers import BertTokenizerFast

    counts = collections.Counter(w.lower() if lowercase else w for w in words)
    chars = sorted({c for w in counts for c in w})
    vocab = SPECIALS + chars + [f"##{c}" for c in chars]
    vocab += [w for w, _ in counts.most_common(size) if w not in set(vocab)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast.from_pretrained(str(out_dir), do_lower_case=lowercase)
    tok.save_pretrained(str(out_dir))
    return tok


def build_tiny_model(out_dir: Path, task: str, labels: list[str] | None, words: list[str], lowercase: bool = True,
                     seed: int = 0, **config: Any) -> Path:
    """Save a tiny BERT (hidden 32, 2 layers) with a tokenizer built from `words`.

    With `labels` the model gets a task head; without, it is a bare encoder (like MiniLM).
    """
    import torch
    from transformers import BertConfig, BertModel

    from compressor.tasks import task_for

    tok = build_tokenizer(words, out_dir, lowercase)
    settings = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128)
    settings.update(config)
    torch.manual_seed(seed)
    if labels:
        cfg = BertConfig(**settings, num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={l: i for i, l in enumerate(labels)})
        model = task_for(task).model_class().from_config(cfg)
    else:
        model = BertModel(BertConfig(**settings))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


#: ChatML, as SmolLM2 and Qwen write it (the tiny LLM's chat template).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


#: Decoder families the tiny builder makes: (transformers config class, model class, settings of the family).
TINY_DECODERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"original_max_position_embeddings": 256,
                                               "tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 128}),
}


def build_tiny_llama(out_dir: Path, texts: list[str], seed: int = 0, chat: bool = True, family: str = "llama",
                     **config: Any) -> Path:
    """Save a tiny decoder of `family` (TINY_DECODERS; by default Llama: hidden 64, 2 layers, 4 query / 2
    key-value heads 16 wide, as onnxruntime's GroupQueryAttention CPU kernel needs, tied embeddings) with a byte-level
    BPE tokenizer trained on `texts` and, with `chat`, a ChatML chat template."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  model_input_names=["input_ids", "attention_mask"])
    if chat:
        tok.chat_template = CHATML
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    settings = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    config_class, model_class, family_settings = TINY_DECODERS[family]
    settings.update(family_settings)
    settings.update(config)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings))
    model.save_pretrained(str(out_dir))
    return out_dir


def sst2_words(limit: int = 20000) -> list[str]:
    """Words of the first rows of the real SST-2 train split."""
    words: list[str] = []
    with open(require_data("sst2/train.tsv") / "sst2" / "train.tsv", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for i, row in enumerate(reader):
            if i >= limit:
                break
            words += row[0].split()
    return words


def conll_words(limit: int = 60000) -> list[str]:
    """Words of the real CoNLL-2003 train split."""
    words: list[str] = []
    with open(require_data("conll2003/train.txt") / "conll2003" / "train.txt", encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if parts and parts[0] != "-DOCSTART-":
                words.append(parts[0])
                if len(words) >= limit:
                    break
    return words


CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def register_plugin(host: Any, plugin: Any, name: str = "inline") -> None:
    """Register an inline plugin object on a built host, through the same path as installed ones."""
    from compressor.host import _load_one

    _load_one(host, name, "inline", "0", lambda: plugin)
    if any(p.name == name and p.error for p in host.plugins):
        raise RuntimeError(next(p.error for p in host.plugins if p.name == name))


@contextlib.contextmanager
def cache_dir(path: Path | None) -> Iterator[None]:
    """COMPRESSOR_CACHE_DIR set to `path` for the block only (unchanged when None); the caller's value is
    restored, so that tests do not depend on the order they run in."""
    from compressor.run.cache import CACHE_ENV

    if path is None:
        yield
        return
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before


def run_recipe(yaml_text: str, tmp_path: Path, host: Any = None, overrides: list[str] | None = None,
               cache: Path | None = None) -> dict:
    """Write the recipe into tmp_path, run it into tmp_path/run, return the record (raises on failure).
    `cache`: the step cache to use for this run only (default: $COMPRESSOR_CACHE_DIR)."""
    from compressor.host import build_host
    from compressor.run.pipeline import run_plan
    from compressor.recipe.plan import build_plan

    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text, encoding="utf-8")
    host = host or build_host()
    with cache_dir(cache):
        plan = build_plan(recipe, host, overrides or [])
        run_plan(plan, host, tmp_path / "run", log=lambda s: None)
    return json.loads((tmp_path / "run" / "record.json").read_text())


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT sentence classifier (labels negative/positive) with an SST-2 vocabulary."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-text"), "text-classification",
                            ["negative", "positive"], sst2_words())


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder without a task head (finetune adds one), SST-2 vocabulary."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-encoder"), "text-classification", None, sst2_words())


@pytest.fixture(scope="session")
def tiny_token_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT token classifier with the CoNLL-2003 labels and a cased CoNLL vocabulary."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-token"), "token-classification", CONLL_LABELS,
                            conll_words(), lowercase=False)


def tiny_llama_texts() -> list[str]:
    """What the tiny Llamas' tokenizer is trained on: real SST-2 and WikiText-2 lines."""
    src = require_data("sst2/train.tsv", "wikitext-2/valid.txt")
    texts = [line.split("\t")[0] for line in (src / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:3000]]
    texts += (src / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()[:2000]
    return texts + ["positive", "negative"] * 50


@pytest.fixture(scope="session")
def device_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding only what a bundle needs on the device: numpy, onnxruntime and
    tokenizers, and the server libraries of serve.py (fastapi, uvicorn, prometheus_client, jinja2), at the pinned
    versions (no torch, no transformers, no compressor)."""
    import subprocess
    import sys

    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pins = {}
    for line in (Path(__file__).resolve().parent.parent / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        pins[name.strip().lower()] = version.strip()
    packages = [f"{n}=={pins[n]}" if n in pins else n
                for n in ("numpy", "onnxruntime", "tokenizers", "fastapi", "uvicorn", "prometheus_client", "jinja2")]
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.lower()
    assert "torch" not in freeze and "transformers" not in freeze and "compressor" not in freeze
    return python


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (GQA, tied embeddings, ChatML template) with a BPE tokenizer trained on SST-2 and WikiText-2."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_llama_texts())


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Slices of the real SST-2: 2000 train rows and the first 200 dev rows."""
    src = require_data("sst2/train.tsv", "sst2/dev.tsv") / "sst2"
    d = tmp_path_factory.mktemp("sst2")
    return {"train": write_tsv_slice(src / "train.tsv", d / "train.tsv", 2000),
            "eval": write_tsv_slice(src / "dev.tsv", d / "dev.tsv", 200)}


@pytest.fixture(scope="session")
def conll_small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Slices of the real CoNLL-2003: 600 train and 150 validation sentences."""
    src = require_data("conll2003/train.txt", "conll2003/valid.txt") / "conll2003"
    d = tmp_path_factory.mktemp("conll")
    return {"train": write_conll_slice(src / "train.txt", d / "train.txt", 600),
            "eval": write_conll_slice(src / "valid.txt", d / "valid.txt", 150)}


@pytest.fixture
def compressor_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty step cache for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(root))
    return root
