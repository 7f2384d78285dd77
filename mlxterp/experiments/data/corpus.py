"""A corpus written by people that needs no model hub: documentation from Debian's archive.

Two documentation packages, fetched once from deb.debian.org (a package registry, reachable
where pip is) and checked against their sha256:

- `linux-doc-6.1` 6.1.176-1: the Linux kernel's documentation, 3,184 reStructuredText files,
  3.1 million words (GPL-2.0-only, as the kernel).
- `python3.11-doc` 3.11.2-6+deb12u8: the Python 3.11 documentation's reStructuredText sources,
  497 files, 1.4 million words (PSF-2.0).

Each file is a document. A document is held out when the first byte of the sha256 of its path
is below 13 (5 %), so the split never changes and never splits a document: 3,492 training
documents (4.3 million words, 9.9 million SmolLM2 tokens) and 189 held out (217,000 words).

Example:
    >>> train, held_out = debian_docs()
    >>> len(train), len(held_out)
    (3492, 189)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import tarfile
import urllib.request
from collections.abc import Sequence

import mlx.core as mx

from mlxterp.errors import InputError, InputTypeError
from mlxterp.models.load import cache_dir

ARCHIVE = "http://deb.debian.org/debian/pool/main"
PACKAGES = {  # name: (path in the archive, sha256, which members are documents)
    "linux-doc-6.1": (
        "l/linux/linux-doc-6.1_6.1.176-1_all.deb",
        "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
        ".rst.gz",
    ),
    "python3.11-doc": (
        "p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb",
        "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        ".rst.txt",
    ),
}
HELD_OUT_BELOW = 13  # of 256: about 5 % of documents


def debian_docs() -> tuple[list[str], list[str]]:
    """(training, held-out) documents of the corpus, downloading it on first use (49 MB) into
    mlxterp's cache folder (`$MLXTERP_CACHE`, else `~/.cache/mlxterp`).

    Raises:
        InputError: the archive cannot be reached, or a file does not match its sha256.

    Example:
        >>> train, held_out = debian_docs()
    """
    train, held_out = [], []
    for name in PACKAGES:
        for path, text in _documents(name):
            (held_out if hashlib.sha256(path.encode()).digest()[0] < HELD_OUT_BELOW else train).append(text)
    return train, held_out


def _documents(name: str) -> list[tuple[str, str]]:
    cached = cache_dir() / "corpus" / f"{name}.jsonl"
    if not cached.exists():
        documents = _extract(_download(name), PACKAGES[name][2])
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial")
        partial.write_text("".join(json.dumps({"path": p, "text": t}) + "\n" for p, t in documents))
        partial.replace(cached)
    return [(row["path"], row["text"]) for row in map(json.loads, cached.read_text().splitlines())]


def _download(name: str) -> bytes:
    path, sha256, _ = PACKAGES[name]
    url = f"{ARCHIVE}/{path}"
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
    except OSError as err:
        raise InputError(
            f"cannot download the corpus package {name} from {url} ({err}); the corpus "
            "needs deb.debian.org once, then it is cached."
        ) from err
    if hashlib.sha256(data).hexdigest() != sha256:
        raise InputError(
            f"{url} does not match its sha256 {sha256}: the archive changed or the "
            "download broke. Delete nothing; try again, or report it."
        )
    return data


def _extract(deb: bytes, suffix: str) -> list[tuple[str, str]]:
    """The documents in a .deb (an ar archive holding data.tar.xz), sorted by path."""
    members, offset = {}, 8  # after the "!<arch>\n" magic
    while offset < len(deb):
        header = deb[offset : offset + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        members[member] = deb[offset + 60 : offset + 60 + size]
        offset += 60 + size + size % 2
    documents = []
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(members["data.tar.xz"]))) as archive:
        for info in archive:
            if info.isfile() and info.name.endswith(suffix):
                raw = archive.extractfile(info).read()
                text = (gzip.decompress(raw) if suffix.endswith(".gz") else raw).decode("utf-8", "replace")
                documents.append((info.name.removeprefix("./"), text))
    return sorted(documents)


def token_windows(model, texts: Sequence[str], length: int) -> mx.array:
    """The texts tokenised one after another and cut into windows (n, length) of token ids,
    each starting with the tokenizer's BOS token when it has one.

    Raises:
        InputTypeError: texts that are not a non-empty list of strings, or too short for a window.

    Example:
        >>> token_windows(model, python_reference_text()[1], 64).shape
        (267, 64)
    """
    if not isinstance(texts, Sequence) or isinstance(texts, str) or not texts:
        raise InputTypeError("texts must be a non-empty list of strings.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise InputTypeError(f"length={length!r}: windows need at least 2 tokens.")
    if not all(isinstance(text, str) for text in texts):
        raise InputTypeError("texts must be strings; one is not.")
    bos = getattr(model.tokenizer, "bos_token_id", None)
    stream = [i for text in texts for i in model.tokenizer.encode(text, add_special_tokens=False)]
    body = length - (bos is not None)
    windows = [
        ([bos] if bos is not None else []) + stream[i : i + body]
        for i in range(0, len(stream) - body + 1, body)
    ]
    if not windows:
        raise InputTypeError(f"the texts give {len(stream)} tokens, fewer than one window of {length}.")
    return mx.array(windows)
