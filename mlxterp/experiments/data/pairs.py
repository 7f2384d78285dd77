"""Datasets of prompt pairs: read from a list, a CSV or a JSON Lines file, or made by the IOI
generator, and grouped by token length for the runners (pairs are never padded).

A file has the columns `clean` and `corrupted`, and optionally `answer` and `wrong_answer` (the
tokens a logit difference compares, per pair).

Example:
    >>> pairs = ioi_pairs(64, seed=0)
    >>> save_pairs(pairs, "ioi.jsonl")
    >>> result = model.patching_sweep(pairs=load_pairs("ioi.jsonl"), metric="logit_diff")
    >>> result.mean, result.standard_error
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mlxterp.errors import InputError, InputTypeError
from mlxterp.experiments.data.corruption import Noise
from mlxterp.paths import output_path, write_atomically
from mlxterp.tracing.inputs import is_index

COLUMNS = ("clean", "corrupted", "answer", "wrong_answer")
FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class PromptPair:
    """One clean prompt, its corrupted twin (same number of tokens), and optionally the answer
    tokens a logit difference compares: `answer` (the clean run's) and `wrong_answer`, as text
    or token ids.

    Example:
        >>> PromptPair("When Mary and John went to the store, John gave a drink to",
        ...            "When John and Mary went to the store, Mary gave a drink to", " Mary", " John")
    """

    clean: str
    corrupted: str
    answer: str | int | None = None  # a token as text (' Mary') or its id
    wrong_answer: str | int | None = None

    def __post_init__(self):
        for column in COLUMNS:
            value = getattr(self, column)
            prompt = column in COLUMNS[:2]
            if not (isinstance(value, str) or not prompt and (value is None or is_index(value))):
                raise InputTypeError(f"{column}={value!r}: give text" + (
                    "." if prompt else ", a token id or None."))
            if value == "":
                raise InputError(f"{column} is empty; give text (or leave an answer column out).")


@dataclass(frozen=True)
class Fact:
    """A factual prompt for causal tracing: the prompt, its subject (text that occurs once in
    it, its token positions, or a `Noise` of it) and optionally the answer token (None: the
    model's top next token).

    Example:
        >>> Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris")
    """

    prompt: str
    subject: str | tuple[int, ...] | Noise
    answer: str | int | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt:
            raise InputTypeError(f"prompt={self.prompt!r}: give the prompt as non-empty text.")
        if not (isinstance(self.subject, str | Noise) or isinstance(self.subject, Sequence)
                and all(is_index(p) for p in self.subject)):
            raise InputTypeError(f"subject={self.subject!r}: give text from the prompt, its token "
                                 "positions, or a Noise of it.")
        if not (self.answer is None or isinstance(self.answer, str) or is_index(self.answer)):
            raise InputTypeError(f"answer={self.answer!r}: give a token as text, an id, or None.")


def load_facts(facts: Sequence) -> list[Fact]:
    """Facts from `Fact`s, dicts with the keys prompt, subject and optionally answer, or
    (prompt, subject[, answer]) tuples.

    Raises:
        InputTypeError: a list that is empty or no list, or a fact of the wrong type.
        InputError: a dict with unknown keys.

    Example:
        >>> load_facts([("The Eiffel Tower is located in the city of", "The Eiffel Tower")])
    """
    if isinstance(facts, str | bytes) or not isinstance(facts, Sequence) or not facts:
        raise InputTypeError(f"pairs={facts!r}: give a non-empty list of Fact, dicts or tuples.")
    loaded = []
    for i, fact in enumerate(facts):
        if isinstance(fact, dict):
            unknown = set(fact) - {"prompt", "subject", "answer"}
            if unknown:
                raise InputError(f"fact {i}: unknown keys {sorted(unknown)}; the keys are prompt, subject "
                                 "and optionally answer.")
            fact = Fact(**fact)
        elif isinstance(fact, tuple | list):
            fact = Fact(*fact)
        elif not isinstance(fact, Fact):
            raise InputTypeError(f"fact {i}: {type(fact).__name__}; give a Fact, a dict or a tuple.")
        loaded.append(fact)
    return loaded


def _pair_from(record, where: str) -> PromptPair:
    """A `PromptPair` from a record (a dict or a (clean, corrupted[, answer[, wrong]]) tuple);
    `where` says which record it is in errors."""
    if isinstance(record, PromptPair):
        return record
    if isinstance(record, tuple | list):
        if not 2 <= len(record) <= 4:
            raise InputError(f"{where}: {len(record)} values; give (clean, corrupted[, answer[, "
                             "wrong_answer]]).")
        record = dict(zip(COLUMNS, record, strict=False))
    if not isinstance(record, dict):
        raise InputTypeError(f"{where}: {type(record).__name__}; give a PromptPair, a dict with the "
                             f"columns {list(COLUMNS)}, or a tuple.")
    unknown = set(record) - set(COLUMNS)
    missing = [column for column in COLUMNS[:2] if not record.get(column)]
    if unknown or missing:
        raise InputError(f"{where}: " + (f"unknown columns {sorted(unknown)}" if unknown else
                                         f"no {' or '.join(missing)}") +
                         f"; the columns are {list(COLUMNS[:2])} and optionally {list(COLUMNS[2:])}.")
    try:
        return PromptPair(**{column: record.get(column) or None for column in COLUMNS})
    except (InputError, InputTypeError) as err:
        raise type(err)(f"{where}: {err}") from None


def _read_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"no file {str(path)!r}; give a {' or '.join(FORMATS)} file of prompt pairs.")
    if path.suffix == ".csv":
        with path.open(newline="") as file:
            return list(csv.DictReader(file))
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}, line {number}: not JSON ({err.msg}); each line of a .jsonl "
                                 'file is one object such as {"clean": ..., "corrupted": ...}.') from None
    return records


def load_pairs(source: str | Path | Sequence) -> list[PromptPair]:
    """The prompt pairs of `source`: a .csv or .jsonl file, or a list of `PromptPair`s, dicts
    or tuples; each checked, with the line or index of a bad one in the error.

    Raises:
        InputTypeError: a source that is no list or path.
        InputError: a missing file, an unknown suffix, or a record without clean / corrupted (the
            error names the line).

    Example:
        >>> load_pairs([("The capital of France is", "The capital of Italy is", " Paris", " Rome")])
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if path.suffix not in FORMATS:
            raise InputError(f"{str(path)!r}: prompt pairs are read from {' or '.join(FORMATS)} files.")
        # A CSV's first row is its header, so its records start on line 2.
        first = 2 if path.suffix == ".csv" else 1
        pairs = [_pair_from(record, f"{path}, record {i + first - 1}")
                 for i, record in enumerate(_read_file(path), 1)]
    elif isinstance(source, Sequence):
        pairs = [_pair_from(record, f"pair {i}") for i, record in enumerate(source)]
    else:
        raise InputTypeError(f"pairs={type(source).__name__}: give a .csv or .jsonl path, or a list of "
                             "PromptPair, dicts or (clean, corrupted[, answer, wrong_answer]) tuples.")
    if not pairs:
        raise InputError(f"{source!r} holds no prompt pairs." if isinstance(source, str | Path)
                         else "no prompt pairs given.")
    return pairs


def save_pairs(pairs: Sequence[PromptPair], path: str | Path, overwrite: bool = False) -> Path:
    """Write pairs as .csv or .jsonl (by the extension), the columns `load_pairs` reads.

    Raises:
        OutputPathError: an existing file without `overwrite=True`, or a suffix other than
            .csv / .jsonl.

    Example:
        >>> save_pairs(ioi_pairs(64), "ioi.csv")
    """
    pairs = load_pairs(pairs)
    target = output_path(path, set(FORMATS), overwrite)
    rows = [asdict(pair) for pair in pairs]

    def write(temporary: Path) -> None:
        if target.suffix == ".csv":
            with temporary.open("w", newline="") as file:
                writer = csv.DictWriter(file, [f.name for f in fields(PromptPair)])
                writer.writeheader()
                writer.writerows(rows)
        else:
            temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))

    return write_atomically(target, write)


# Indirect object identification (Wang et al. 2022): the first clause names two people, the
# second names one of them again (the subject: S1, then S2); the model should complete with the
# other (the indirect object, IO). Templates of the paper's kind, written here, in the ABBA order;
# the BABA order swaps the first clause's names. Every name, place and object follows a space and
# is one token so in SmolLM2's and Gemma 3's tokenizers, so a pair's prompts have one length
# (tests/test_datasets.py checks).
IOI_TEMPLATES = (
    "Then, {IO} and {S1} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "When {IO} and {S1} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "After {IO} and {S1} arrived at the {PLACE}, {S2} handed the {OBJECT} to",
    "While {IO} and {S1} were working at the {PLACE}, {S2} passed a {OBJECT} to",
    "Friends {IO} and {S1} found a {OBJECT} at the {PLACE}. {S2} gave it to",
    "Later, {IO} and {S1} had a long day at the {PLACE}, so {S2} brought a {OBJECT} to",
)
IOI_NAMES = ("Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Anna", "Emma", "David",
             "Michael", "Lisa", "Paul", "Mark", "Kate", "Laura", "Daniel", "Rachel", "Peter", "Jack",
             "Susan", "Linda", "Kevin", "Brian", "Amy", "Adam", "Ryan", "Eric", "Grace", "Henry")
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "park", "station",
              "house", "library", "market", "beach", "museum", "hotel")
IOI_OBJECTS = ("drink", "ring", "book", "ball", "basket", "computer", "snack", "necklace", "bottle",
               "letter", "key", "flower", "bag", "box", "gift", "cake")
IOI_CORRUPTIONS = ("swap", "abc")


def ioi_pairs(n: int, seed: int = 0, corruption: str = "swap") -> list[PromptPair]:
    """`n` indirect-object-identification pairs, half in the ABBA order and half BABA, over the
    templates, names, places and objects above, with answer = the IO and wrong_answer = the S.

    `corruption` makes the corrupted prompt: "swap" exchanges the two names everywhere, so the
    corrupted run's answer is the other name (the logit difference flips sign); "abc" puts three
    other names in the IO, S1 and S2 places (Wang et al.'s ABC distribution: no answer is implied).

    Raises:
        InputTypeError: `n` or `seed` not a whole number.
        InputError: `n` below 1 or an unknown `corruption`.

    Example:
        >>> ioi_pairs(2, seed=1)[0]
        PromptPair(clean='...', corrupted='...', answer=' ...', wrong_answer=' ...')
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputTypeError(f"n={n!r}: give how many pairs to make, at least 1.")
    if corruption not in IOI_CORRUPTIONS:
        raise InputTypeError(f"corruption={corruption!r}: use {' or '.join(map(repr, IOI_CORRUPTIONS))}.")
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        template = IOI_TEMPLATES[i // 2 % len(IOI_TEMPLATES)]
        if i % 2:  # BABA: the subject is named first
            template = template.replace("{IO} and {S1}", "{S1} and {IO}")
        io, s, *others = rng.sample(IOI_NAMES, 5)
        words = {"PLACE": rng.choice(IOI_PLACES), "OBJECT": rng.choice(IOI_OBJECTS)}
        clean = template.format(IO=io, S1=s, S2=s, **words)
        if corruption == "swap":
            corrupted = template.format(IO=s, S1=io, S2=io, **words)
        else:
            corrupted = template.format(**dict(zip(("IO", "S1", "S2"), others, strict=True)), **words)
        pairs.append(PromptPair(clean, corrupted, f" {io}", f" {s}"))
    return pairs
