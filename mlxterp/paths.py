"""Where results are written: paths checked before anything is drawn or saved.

Example:
    >>> output_path("out/result.json", {".json"}, overwrite=False)
    PosixPath('out/result.json')
    >>> numbered(Path("out"), "patch-smollm2-135m-mlp-layer-kl", ".png")
    PosixPath('out/patch-smollm2-135m-mlp-layer-kl-2.png')   # when the first exists
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mlxterp.errors import OutputPathError

# Files being written right now (their temporary names): what an interrupted command removes.
_partial: set[Path] = set()


def output_path(path: str | Path, suffixes: set[str], overwrite: bool) -> Path:
    """`path` as a Path, if its extension is one of `suffixes` and it may be written."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise OutputPathError(
            f"{str(path)!r} has the extension {path.suffix or '(none)'!r}; use one of "
            f"{', '.join(sorted(suffixes))}."
        )
    if path.exists() and not overwrite:
        raise OutputPathError(f"{str(path)!r} exists; pass overwrite=True to replace it, or another path.")
    if not path.parent.is_dir():
        raise OutputPathError(f"the folder {str(path.parent)!r} does not exist; create it first.")
    return path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary)` then the temporary file renamed to `path`: a file that is there is
    whole. The temporary file is `.NAME.partial-PID.SUFFIX` beside it (the suffix kept for
    writers that read the format from it; the process id so that two processes writing the same
    file do not share one); an interrupted command removes it (`remove_partial_files`).

    Example:
        >>> write_atomically(Path("out/r.json"), lambda p: p.write_text("{}"))
    """
    temporary = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    _partial.add(temporary)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        _partial.discard(temporary)
    return path


def remove_partial_files() -> None:
    """Remove the files being written (for a command stopped part way, e.g. by Ctrl-C)."""
    for temporary in list(_partial):
        temporary.unlink(missing_ok=True)


def numbered(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/stem.suffix`, or `stem-2`, `stem-3`, ... : the first name not yet taken."""
    path, number = folder / f"{stem}{suffix}", 1
    while path.exists():
        number += 1
        path = folder / f"{stem}-{number}{suffix}"
    return path
