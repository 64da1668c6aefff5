"""Reading the recipe's labelled data: tsv, csv, jsonl, CoNLL files and `datasets` directories.

Rows are plain Python: `Example(text, label)` where for token classification `text` is a
list of words and `label` a list of tags. No torch here: the plan reads data to check it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import InputError

DATA_FORMATS = ("tsv", "csv", "jsonl", "conll", "datasets", "text")


@dataclass(frozen=True)
class Example:
    """One row: a sentence and its label, a pair of sentences (a tuple) and their score, words and their tags,
    or a prompt and its completion (for a language model; `label` None for plain text). `chat`: wrap the prompt in the chat template (None:
    when the tokenizer has one)."""

    text: Any
    label: Any
    chat: bool | None = None
    #: the row's line in its file (delimited and jsonl files), for messages that point at it
    line: int | None = field(default=None, compare=False)


def _read_delimited(path: Path, delimiter: str, text: str | list[str], label: str, where: str,
                    columns: list[str] | None = None) -> list[Example]:
    """Rows of a tsv/csv file: with a header row, or, given `columns`, headerless (each row needs at least those
    fields; later ones are ignored, as STS-B's trailing source notes are). A list `text` reads a pair of columns."""
    wanted = list(text) if isinstance(text, list) else [text]
    with open(path, encoding="utf-8", newline="") as fh:
        # SST-2 style files are unquoted; quoting only applies to csv.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        header = list(columns) if columns else next(reader, [])
        for column in wanted + [label]:
            if column not in header:
                raise InputError(f"column {column!r} is not in {path} (columns: {', '.join(header) or 'none'})",
                                 where=where, hint="set data.text / data.label to " + (
                                     "names in data.columns" if columns else "the file's column names"))
        index = {name: i for i, name in enumerate(header)}
        needed = max(index[c] for c in wanted + [label]) + 1
        rows = []
        for fields in reader:
            number = reader.line_num
            if not fields:
                continue
            if len(fields) < needed if columns else len(fields) != len(header):
                missing = header[len(fields)] if len(fields) < len(header) else None
                raise InputError(f"line {number} of {path} has {len(fields)} column(s), "
                                 + (f"so column {missing!r} is missing" if columns and missing else
                                    f"the header has {len(header)}"), where=where,
                                 hint="every row needs one value per " + ("named column" if columns else
                                                                          "header column")
                                      + (" (tab-separated for tsv)" if delimiter == "\t" else ""))
            texts = tuple(fields[index[c]] for c in wanted)
            rows.append(Example(texts if isinstance(text, list) else texts[0], fields[index[label]].strip(),
                                line=number))
        return rows


def _read_jsonl(path: Path, text: str | list[str], label: str, where: str) -> list[Example]:
    wanted = list(text) if isinstance(text, list) else [text]
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"line {number} of {path} is not JSON: {exc.msg}", where=where,
                                 hint="each line of a jsonl file must be one JSON object") from None
            if not isinstance(obj, dict) or any(k not in obj for k in wanted + [label]):
                raise InputError(f"line {number} of {path} lacks {' or '.join(map(repr, wanted + [label]))}",
                                 where=where, hint="set data.text / data.label to the objects' keys")
            value = obj[label]
            texts = tuple(obj[k] for k in wanted)
            rows.append(Example(texts if isinstance(text, list) else texts[0],
                                [str(v) for v in value] if isinstance(value, list) else str(value), line=number))
    return rows


def _read_text(path: Path) -> list[Example]:
    """Plain text: one row per non-blank line (a paragraph), no label."""
    with open(path, encoding="utf-8") as fh:
        return [Example(line.strip(), None) for line in fh if line.strip()]


def read_text_rows(path: Path) -> list[Example]:
    """A plain-text file's rows (one per non-blank line, no label), as data.format text reads them."""
    return _read_text(Path(path))


def _read_conll(path: Path, where: str) -> list[Example]:
    """CoNLL-2003 style: `word POS chunk TAG` per line, blank lines between sentences."""
    rows: list[Example] = []
    words: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if words:
                    rows.append(Example(words, tags))
                words, tags = [], []
                continue
            if len(parts) < 2:
                raise InputError(f"line {number} of {path} has no tag column", where=where,
                                 hint="CoNLL files hold `word ... TAG` per line")
            words.append(parts[0])
            tags.append(parts[-1])
    if words:
        rows.append(Example(words, tags))
    return rows


def _read_datasets_dir(path: Path, split: str, text: str, label: str, where: str) -> list[Example]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise InputError("data.format 'datasets' needs the `datasets` package", where=where,
                         hint="pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    names = ds.features[label].names if hasattr(ds.features[label], "names") else None
    feature = getattr(ds.features[label], "feature", None)
    names = names or getattr(feature, "names", None)

    def _name(v: Any) -> Any:
        if isinstance(v, list):
            return [_name(x) for x in v]
        return names[v] if names and isinstance(v, int) else str(v)

    return [Example(row[text], _name(row[label])) for row in ds]


def all_labels(rows: list[Example]) -> set[str]:
    """Every label (or, for token classification, every tag) in the rows."""
    return {l for r in rows for l in (r.label if isinstance(r.label, list) else [r.label])}


#: The split that settings are chosen on: data.validation, or rows held out of data.train.
TUNE = "tune"


def _words(text: Any) -> str:
    return " ".join(str(text).split())


def split_whole_sentences(rows: list[Example], count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, tune): `count` seeded whole sentences — rows whose text no other row contains, word for word —
    as tune, and as train every row that is not a phrase (a run of whole words) of one of them. For files that,
    like SST-2's train, hold every phrase of their sentences: tuning rows that look like whole-sentence eval
    rows, with no part of them trained on."""
    import random
    from collections import defaultdict

    texts = [f" {_words(r.text)} " for r in rows]
    containing: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        for word in set(text.split()):
            containing[word].append(i)

    def whole(i: int) -> bool:
        words = set(texts[i].split())
        if not words:
            return False
        rarest = min(words, key=lambda w: len(containing[w]))
        return not any(j != i and texts[i] in texts[j] for j in containing[rarest])

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held: list[int] = []
    for i in order:
        if len(held) == count:
            break
        if whole(i):
            held.append(i)
    if len(held) < count:
        raise InputError(f"data.holdout is {count} whole sentences but data.train has only {len(held)} rows that "
                         f"no other row contains", where="data.holdout",
                         hint="hold out fewer sentences, or use data.holdout_from: rows")
    phrases = set()
    for i in held:
        words = texts[i].split()
        phrases.update(" ".join(words[a:b]) for a in range(len(words)) for b in range(a + 1, len(words) + 1))
    held_set = set(held)
    train = [r for i, r in enumerate(rows) if i not in held_set and texts[i].strip() not in phrases]
    return train, [rows[i] for i in sorted(held_set)]


@dataclass
class DataSource:
    """The recipe's `data:` section bound to the recipe's directory.

    Splits are `train`, `eval` and `validation` files; `tune` is where settings are chosen: the
    validation file, or `holdout` seeded random rows of train, which `load("train")` then leaves out.
    With `holdout_from="sentences"` the held-out rows are whole sentences (rows no other train row
    contains), and train also leaves out every row that is a phrase of one of them.
    """

    format: str
    splits: dict[str, Path]
    text: str | list[str]
    label: str
    holdout: int | None = None
    seed: int = 0
    holdout_from: str = "rows"
    #: an instruction template with `{text}` (a row's text becomes the prompt), the completion of each
    #: label, and whether prompts go into the chat template: how a labelled file reads as prompts and answers
    prompt: str | None = None
    completions: dict[str, str] | None = None
    chat_template: bool | None = None
    #: names of a headerless tsv/csv file's leading columns (data.columns)
    columns: list[str] | None = None
    _rows: dict[str, list[Example]] = field(default_factory=dict, repr=False, compare=False)
    _held_out: tuple[list[Example], list[Example]] | None = field(default=None, repr=False, compare=False)

    def has(self, split: str) -> bool:
        """Whether the recipe gives this split (`tune`: a validation file or held-out train rows)."""
        if split == TUNE:
            return "validation" in self.splits or (bool(self.holdout) and "train" in self.splits)
        return split in self.splits

    def tuning_source(self) -> str:
        """Where the tuning rows come from, as the record and the report say it."""
        if "validation" in self.splits:
            return f"data.validation ({self.splits['validation'].name})"
        if self.holdout_from == "sentences":
            return (f"{self.holdout} whole sentences held out of data.train (seed {self.seed}); no step trains on "
                    f"them or on any of their phrases")
        return f"{self.holdout} rows held out of data.train (seed {self.seed}), used by no other step"

    def load(self, split: str) -> list[Example]:
        """All rows of a split, with clear errors for missing, empty or non-UTF-8 files. Each file
        is read once per DataSource (check's label checks, then every step, share the rows).
        `train` leaves out the held-out rows; `tune` is validation, else the held-out rows."""
        if split == TUNE and "validation" in self.splits:
            split = "validation"
        if split in ("train", TUNE) and self.holdout and "validation" not in self.splits:
            train, held = self._split_holdout()
            return list(train if split == "train" else held)
        if split == TUNE:
            raise InputError("no tuning rows: the recipe gives neither data.validation nor data.holdout",
                             where="data", hint="add data.validation: PATH, or data.holdout: N to hold out N "
                                                "train rows")
        return list(self._raw(split))

    def _raw(self, split: str) -> list[Example]:
        if split not in self._rows:
            self._rows[split] = self._read(split)
        return self._rows[split]

    def _split_holdout(self) -> tuple[list[Example], list[Example]]:
        import random

        if self._held_out is not None:
            return self._held_out
        rows = self._raw("train")
        if self.holdout and self.holdout >= len(rows):
            raise InputError(f"data.holdout is {self.holdout} but data.train has only {len(rows)} rows",
                             where="data.holdout", hint="hold out fewer rows, or give data.validation")
        if self.holdout_from == "sentences":
            train, tune = split_whole_sentences(rows, self.holdout or 0, self.seed)
        else:
            held = set(random.Random(self.seed).sample(range(len(rows)), self.holdout or 0))
            train = [r for i, r in enumerate(rows) if i not in held]
            tune = [r for i, r in enumerate(rows) if i in held]
        self._held_out = (train, tune)
        return self._held_out

    def _read(self, split: str) -> list[Example]:
        where = f"data.{split}"
        if split not in self.splits:
            raise InputError(f"the recipe has no {split} data", where="data", hint=f"add data.{split}: PATH")
        path = self.splits[split]
        if not path.exists():
            raise InputError(f"{path} does not exist", where=where, hint="fix the path (relative to the recipe file)")
        if self.format != "datasets" and not path.is_file():
            raise InputError(f"{path} is not a file", where=where, hint=f"data.{split} names a {self.format} file")
        if self.format != "datasets" and path.stat().st_size == 0:
            raise InputError(f"{path} is empty", where=where, hint="point to a file with a header and labelled rows")
        try:
            if self.format == "datasets":
                rows = _read_datasets_dir(path, split, self.text, self.label, where)
            elif self.format == "conll":
                rows = _read_conll(path, where)
            elif self.format == "jsonl":
                rows = _read_jsonl(path, self.text, self.label, where)
            elif self.format == "text":
                rows = _read_text(path)
            else:
                rows = _read_delimited(path, "\t" if self.format == "tsv" else ",", self.text, self.label, where,
                                      self.columns)
        except UnicodeDecodeError as exc:
            raise InputError(f"{path} is not UTF-8 (byte {exc.start}: {exc.reason})", where=where,
                             hint="re-encode the file as UTF-8") from None
        except csv.Error as exc:
            raise InputError(f"{path} could not be parsed: {exc}", where=where) from None
        if not rows:
            raise InputError(f"{path} holds no rows", where=where, hint="point to a file with labelled rows")
        return self._as_prompts(rows, path, where) if self.reads_prompts else rows

    @property
    def reads_prompts(self) -> bool:
        """Whether rows are read as prompts and completions (data.prompt, completions or chat_template set)."""
        return bool(self.prompt or self.completions) or self.chat_template is not None

    def _as_prompts(self, rows: list[Example], path: Path, where: str) -> list[Example]:
        """Rows as prompts and completions: data.prompt's template, data.completions' answers."""
        out = []
        for number, row in enumerate(rows, 1):
            text = self.prompt.replace("{text}", str(row.text)) if self.prompt else row.text
            label = row.label
            if self.completions is not None and label is not None:
                if str(label) not in self.completions:
                    raise InputError(f"row {number} of {path} has label {label!r}, which data.completions does not "
                                     f"name ({', '.join(map(repr, self.completions))})", where=where,
                                     hint="add the label to data.completions")
                label = self.completions[str(label)]
            out.append(Example(text, label, self.chat_template))
        return out

    def label_set(self, split: str) -> set[str]:
        """Every label (or tag) that occurs in a split."""
        return all_labels(self.load(split))

    def digest(self, splits: tuple[str, ...] | list[str] | None = None) -> str:
        """sha256 over the data files' bytes and the column settings (part of cache keys). With `splits`,
        only what those splits read: a step that trains is not rerun when the eval file changes."""
        files_of = {s: [s] for s in self.splits}
        if self.holdout and "validation" not in self.splits:  # held-out rows shape both train and tune
            files_of.update(train=["train"], tune=["train"])
        elif "validation" in self.splits:
            files_of["tune"] = ["validation"]
        wanted = sorted({f for s in (self.splits if splits is None else splits) for f in files_of.get(s, [])})
        held = [self.holdout, self.seed] if self.holdout and set(wanted) & {"train"} else []
        if held and self.holdout_from != "rows":
            held.append(self.holdout_from)
        h = hashlib.sha256(json.dumps([self.format, self.text, self.label] + ([self.columns] if self.columns else [])
                                      + held
                                      + ([self.prompt, self.completions, self.chat_template]
                                         if self.reads_prompts else [])).encode())
        for split in wanted:
            path = self.splits[split]
            h.update(split.encode())
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                if file.exists():
                    h.update(file.read_bytes())
        return h.hexdigest()


def label_ids(labels: list[str], data_labels: set[str]) -> dict[str, int]:
    """Map data label strings to model label ids.

    Data labels match model label names; integer labels (SST-2's `0`/`1`) are taken as ids.
    Raises InputError naming the labels the model does not have.
    """
    mapping = {name: i for i, name in enumerate(labels)}
    if all(lbl.isdigit() for lbl in data_labels) and not data_labels <= set(mapping):
        mapping = {str(i): i for i in range(len(labels))}
    unknown = sorted(data_labels - set(mapping))
    if unknown:
        raise InputError(f"the data has labels the model does not have: {', '.join(unknown[:10])}",
                         where="data", hint=f"the model's labels are: {', '.join(labels)}")
    return mapping
