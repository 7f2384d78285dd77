"""Every code block of README.md and docs/*.md runs as written, and prints what the page shows.

How a page is read:

- Python blocks (```python) of one page run in order, in one namespace, in a fresh subprocess
  per page whose working folder is a new temporary folder (files the docs write land there).
- A plain block (```text or ```) directly after a code block, with only blank lines between, is
  that block's printed output, compared line by line (see `same_line` for the tolerance). A
  block that ends in an exception shows it as its last output lines, `ErrorClass: message`.
- Bash blocks (```bash) run in the page's folder, in order with the Python blocks: every
  command (a line, or a part of an `a && b` line) that invokes `mlxterp`, `.venv/bin/mlxterp` or
  runs one through `mlx.launch`. Other commands (`scripts/setup.sh`, pytest) are not run: the
  test runs inside the environment they make. The folder holds `.venv`, a link to the
  environment of the Python running the tests, so `.venv/bin/mlxterp` is that environment's.
- A text block that starts with `$ command` is a console transcript: the command runs as a bash
  block and the rest of the block is its output.
- ```json blocks must parse.
- A comment on the line before a block's fence marks it:
  `<!-- docs-test: skip — why -->` is not run (the reason is required: installs packages,
  needs network, runs for hours); `<!-- docs-test: slow -->` runs only in the slow round
  (`pytest -m slow tests/test_docs.py`), where the whole page runs, slow blocks included. Slow
  are blocks that take more than about a minute on a 2-core CPU, and the costliest others, so
  that the default round stays near a minute and a half there. The default round runs each page
  without its slow blocks, so a block that needs a slow block's names must be slow too.

Model loading in the pages uses the bundled models, so every page runs offline.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The pages whose blocks run: the README and every page of docs/ (index.md only includes the
# README, api.md has no code).
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md")
                                     if p.name not in ("index.md", "api.md"))]
API_PAGE = ROOT / "docs" / "api.md"

# --- tolerance -----------------------------------------------------------------------------------
# A printed number with a fraction or an exponent may differ from the page's by one unit in its
# last printed digit (the value may sit on a rounding edge) plus DRIFT times its size; numbers
# without one (token ids, shapes, counts, layer and head labels) must be equal.
#
# DRIFT comes from a measurement (`python tests/test_docs.py --drift`): every page, without its
# slow blocks but with those of patching.md, attribution.md and causal-tracing.md that are slow
# now, ran on this project's 2-core AMD EPYC (OpenBLAS 0.3.21) as is and under
# OPENBLAS_CORETYPE=Haswell, OPENBLAS_CORETYPE=Sandybridge and MLXTERP_NO_BLAS=1 (MLX's reference
# BLAS), and each printed number was compared with the page's. As is, every number was the
# page's. Under the other three, every number printed to 1-6 significant digits stayed within
# one unit of its last digit; only the float printed in full, tracing.md's KL 0.2270854264497757,
# moved beyond it: by 5.4e-6 (Haswell), 1.0e-5 (Sandybridge) and 2.3e-5 (reference BLAS) of its
# size. DRIFT is 1e-4, about 4x the largest, for kernels and CPUs not tried. Under the reference
# BLAS, models.md's BLAS report (blas_status, mlxterp doctor) differs, as it should.
MEASURED_DRIFT = 2.3e-5
DRIFT = 1e-4

# A number: not part of a word (`L23`, `float32`) nor of a version (`0.32.4`, compared as text).
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?!\w|\.\d)")
# The home folder of the machine the pages' outputs were printed on; paths under it (the model
# cache) are compared with the home folder of the machine that runs the test.
DOCS_HOME = "/root"

MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<kind>[\w-]+)\s*(?:[—–:-]+\s*(?P<reason>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^`]*$")
RAISED = re.compile(r"^(?P<name>[A-Z]\w*(?:Error|Exception|Warning)): ", re.M)


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str  # the block's lines, without the fence's indentation
    mark: str | None = None  # "skip" or "slow"
    reason: str = ""
    output: Block | None = None  # the output block that follows it
    commands: list[str] = field(default_factory=list)  # bash or `$ ...`: the commands that run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """Every fenced block of a page, with its mark and, for code, the output block after it."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i, previous_end = 0, -1
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
        block = Block(page, i + 1, m["lang"].lower(), "\n".join(body) + "\n")
        mark = MARK.match(lines[i - 1]) if i > 0 else None
        if mark:
            block.mark, block.reason = mark["kind"], (mark["reason"] or "").strip()
        previous = blocks[-1] if blocks else None
        between = lines[previous_end + 1:i]
        if (previous and previous.lang in ("python", "bash") and block.lang in ("", "text")
                and not block.text.startswith("$ ") and previous.output is None
                and all(not line.strip() for line in between)):
            previous.output = block
        else:
            blocks.append(block)
        previous_end = end
        i = end + 1
    for block in blocks:
        if block.lang == "bash":
            block.commands = runnable_commands(block.text)
        elif block.lang in ("", "text") and block.text.startswith("$ "):
            # a console transcript: `$ command` (continued by lines ending in `\`), then output
            text = block.text.splitlines()
            command = [text[0][2:]]
            while command[-1].rstrip().endswith("\\") and len(command) < len(text):
                command.append(text[len(command)])
            block.commands = runnable_commands("\n".join(command))
            block.output = Block(page, block.line + len(command), "text",
                                 "\n".join(text[len(command):]) + "\n")
    return blocks


def runnable_commands(script: str) -> list[str]:
    """The commands of a bash block that invoke mlxterp, as written: whole lines (continuation
    lines joined), or the parts of an `a && b` line that do."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        for part in split_and(line):
            words = shlex.split(part, comments=True)
            if any(re.fullmatch(r"(?:\S*/)?mlxterp", word) for word in words):
                commands.append(part.strip())
    return commands


def split_and(line: str) -> list[str]:
    """`a && b` -> ["a ", " b"], minding quotes."""
    parts, start, quote = [], 0, ""
    for k, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif line.startswith("&&", k):
            parts.append(line[start:k])
            start = k + 2
    return [*parts, line[start:]]


def all_blocks() -> dict[Path, list[Block]]:
    return {page: read_blocks(page) for page in PAGES}


# --- comparing output ----------------------------------------------------------------------------

def normalise(text: str, home: str) -> list[str]:
    """The lines of `text`, without trailing blanks, with paths under `home` written `~/...`."""
    home = home.rstrip("/") + "/"
    return [line.rstrip().replace(home, "~/") if home != "/" else line.rstrip()
            for line in text.rstrip().splitlines()]


def same_line(expected: str, actual: str, drift: float = DRIFT) -> bool:
    """Equal text between the numbers; integers equal; numbers with a fraction or an exponent
    within one unit of their last printed digit plus `drift` of their size."""
    exp_numbers, act_numbers = NUMBER.findall(expected), NUMBER.findall(actual)
    if NUMBER.sub("#", expected) != NUMBER.sub("#", actual) or len(exp_numbers) != len(act_numbers):
        return False
    return all(same_number(e, a, drift) for e, a in zip(exp_numbers, act_numbers, strict=True))


def last_digit(number: str) -> float:
    """One unit in the last printed digit of `number` (0 for an integer)."""
    mantissa, _, exponent = number.lower().partition("e")
    if "." not in mantissa and not exponent:
        return 0.0
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def same_number(expected: str, actual: str, drift: float) -> bool:
    unit = last_digit(expected)
    if unit == 0.0:
        return expected.lstrip("+") == actual.lstrip("+")
    e, a = float(expected), float(actual)
    if math.isnan(e) or math.isnan(a):
        return math.isnan(e) and math.isnan(a)
    return abs(e - a) <= unit * (1 + 1e-9) + drift * abs(e)


def compare(expected: str, actual: str, drift: float = DRIFT) -> list[str]:
    """The differing lines, as `- page` / `+ printed` pairs; empty when the output matches."""
    exp, act = normalise(expected, DOCS_HOME), normalise(actual, str(Path.home()))
    problems = []
    for k in range(max(len(exp), len(act))):
        e = exp[k] if k < len(exp) else "<no line>"
        a = act[k] if k < len(act) else "<no line>"
        if k >= len(exp) or k >= len(act) or not same_line(e, a, drift):
            problems.append(f"  line {k + 1}:\n  - {e}\n  + {a}")
    return problems


# --- running a page ------------------------------------------------------------------------------

def steps_of(blocks: list[Block], slow: bool) -> list[dict]:
    """What the page's subprocess runs, in order: Python code or shell commands."""
    steps = []
    for block in blocks:
        if block.mark == "skip" or (block.mark == "slow" and not slow):
            continue
        expected = block.output.text if block.output else ""
        step = {"where": block.where, "expects_error": bool(RAISED.search(expected))}
        if block.lang == "python":
            # blank lines in front, so that a traceback's line numbers are the page's
            steps.append({**step, "python": "\n" * block.line + block.text,
                          "file": str(block.page.relative_to(ROOT))})
        elif block.commands:
            steps.append({**step, "commands": block.commands})
    return steps


def environment() -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env.update(PATH=venv_bin + os.pathsep + env.get("PATH", ""), MPLBACKEND="Agg",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_page(blocks: list[Block], slow: bool, env: dict[str, str] | None = None,
             timeout: float = 3600) -> list[dict]:
    """Run a page's blocks in a fresh subprocess in a temporary folder; one result per step."""
    steps = steps_of(blocks, slow)
    with tempfile.TemporaryDirectory(prefix="mlxterp-docs-") as folder:
        (Path(folder) / ".venv").symlink_to(Path(sys.executable).parent.parent)
        spec, results = Path(folder) / ".steps.json", Path(folder) / ".results.json"
        spec.write_text(json.dumps(steps))
        command = [sys.executable, str(Path(__file__).resolve()), "--run", str(spec), str(results)]
        done = subprocess.run(command, cwd=folder, env=env or environment(), capture_output=True, text=True,
                              timeout=timeout, check=False)
        if not results.exists():
            raise AssertionError(f"the page's process failed (status {done.returncode}):\n"
                                 f"{done.stderr[-4000:]}")
        return json.loads(results.read_text())


def execute(spec: str, out: str) -> None:
    """In the page's subprocess: run the steps, write what each printed (and how long it took)."""
    import contextlib
    import io
    import traceback

    steps = json.loads(Path(spec).read_text())
    scope: dict = {"__name__": "__main__"}
    results = []
    for step in steps:
        start = time.perf_counter()
        printed, error, ok = "", "", True
        if "python" in step:
            buffer = io.StringIO()
            try:
                with contextlib.redirect_stdout(buffer):
                    exec(compile(step["python"], step["file"], "exec"), scope)
            except Exception as exc:  # shown as the page shows it: `ErrorClass: message`
                buffer.write(f"{type(exc).__name__}: {exc}\n")
                error, ok = traceback.format_exc(), step["expects_error"]
            printed = buffer.getvalue()
        else:
            for command in step["commands"]:
                done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=False)
                printed += done.stdout
                if done.returncode != 0:
                    error += f"$ {command}\nexit status {done.returncode}\n{done.stderr[-4000:]}"
                    ok = False
        results.append({"where": step["where"], "printed": printed, "error": error,
                        "seconds": round(time.perf_counter() - start, 2)})
        Path(out).write_text(json.dumps(results))
        if not ok:
            break
    Path(out).write_text(json.dumps(results))


def check_page(page: Path, slow: bool) -> None:
    blocks = BLOCKS[page]
    outputs = {b.where: b.output for b in blocks}
    results = run_page(blocks, slow)
    expected_steps = steps_of(blocks, slow)
    problems = []
    for result in results:
        output = outputs[result["where"]]
        if result["error"] and not (output and RAISED.search(output.text)):
            problems.append(f"{result['where']} failed ({result['seconds']} s):\n{result['error']}")
            continue
        if output is not None:
            diff = compare(output.text, result["printed"])
            if diff:
                problems.append(f"{result['where']}: printed output differs from {output.where}:\n"
                                + "\n".join(diff))
    if len(results) < len(expected_steps) and not problems:
        problems.append(f"only {len(results)} of {len(expected_steps)} blocks ran")
    timing = ", ".join(f"{r['where'].rsplit(':', 1)[1]}: {r['seconds']} s" for r in results)
    assert not problems, "\n\n".join(problems) + f"\n\n(seconds per block, by line: {timing})"


# --- the tests -----------------------------------------------------------------------------------

BLOCKS = all_blocks()


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p, b in BLOCKS.items() if steps_of(b, slow=False)], ids=page_id)
def test_page(page):
    """The page's blocks, without those marked slow."""
    check_page(page, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p, b in BLOCKS.items() if any(x.mark == "slow" for x in b)],
                         ids=page_id)
def test_page_with_its_slow_blocks(page):
    check_page(page, slow=True)


def test_marks_are_known_and_skips_say_why():
    problems = []
    for page, blocks in BLOCKS.items():
        for block in blocks:
            if block.mark not in (None, "skip", "slow"):
                problems.append(f"{block.where}: unknown mark {block.mark!r} (skip or slow)")
            if block.mark == "skip" and len(block.reason) < 8:
                problems.append(f"{block.where}: a skipped block needs a reason, "
                                "`<!-- docs-test: skip — why it cannot run here -->`")
        # a mark anywhere but right before a fence would silently mark nothing
        marked = {b.line - 1 for b in blocks if b.mark}
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            if "docs-test:" in line and number not in marked:
                problems.append(f"{page_id(page)}:{number}: a docs-test mark must be the line before a fence")
    assert not problems, "\n".join(problems)


def test_every_shell_block_runs_or_says_why():
    """A bash block or `$ command` transcript runs mlxterp, or is marked skip with its reason."""
    problems = [f"{b.where}: runs no mlxterp command; mark it `<!-- docs-test: skip — why -->`"
                for blocks in BLOCKS.values() for b in blocks
                if (b.lang == "bash" or b.text.startswith("$ ")) and not b.commands and b.mark != "skip"]
    assert not problems, "\n".join(problems)


def test_json_blocks_parse():
    for blocks in BLOCKS.values():
        for block in blocks:
            if block.lang == "json":
                json.loads(block.text)


def test_docs_import_only_top_level_names():
    """`import mlxterp` and `from mlxterp import NAME` for NAME in `mlxterp.__all__`, nothing
    deeper: the pages show the public API only."""
    import mlxterp

    public = set(mlxterp.__all__)
    problems = []
    for blocks in BLOCKS.values():
        for block in (b for b in blocks if b.lang == "python"):
            for node in ast.walk(ast.parse(block.text)):
                if isinstance(node, ast.Import):
                    problems += [f"{block.where}: import {a.name}" for a in node.names
                                 if a.name.startswith("mlxterp.")]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlxterp":
                    if node.module != "mlxterp":
                        problems.append(f"{block.where}: from {node.module} import ...")
                    problems += [f"{block.where}: from mlxterp import {a.name} (not in mlxterp.__all__)"
                                 for a in node.names if a.name not in public]
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id == "mlxterp" and node.attr not in public):
                    problems.append(f"{block.where}: mlxterp.{node.attr} (not in mlxterp.__all__)")
    assert not problems, "\n".join(problems)


API_ENTRY = re.compile(r"^::: (mlxterp(?:\.\w+)+)\s*$", re.M)


def documented_name(path: str) -> str:
    """The public name a `::: path` entry documents: `mlxterp.NAME`, or a longer path to the
    object that `mlxterp.NAME` is (for a name the docs' reader would resolve wrongly)."""
    import importlib

    import mlxterp

    parts = path.split(".")
    if len(parts) == 2:
        return parts[1]
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        break
    name = parts[-1]
    assert getattr(mlxterp, name, None) is obj, f"docs/api.md: {path} is not mlxterp.{name}"
    return name


def test_api_page_documents_exactly_the_public_names():
    import mlxterp

    entries = [documented_name(path) for path in API_ENTRY.findall(API_PAGE.read_text())]
    documented, public = set(entries), set(mlxterp.__all__)
    twice = sorted({e for e in entries if entries.count(e) > 1})
    assert not twice, f"documented twice in docs/api.md: {twice}"
    assert documented == public, (f"add to docs/api.md: {sorted(public - documented)}; "
                                  f"remove from it (not in mlxterp.__all__): {sorted(documented - public)}")


@pytest.mark.slow
def test_site_builds_strictly_and_loads_nothing_from_other_hosts(tmp_path):
    """`mkdocs build --strict` (as .ci/run does), into a scratch folder: every page and
    docstring renders without a warning, and the pages load no script or style from the web."""
    pytest.importorskip("mkdocs", reason="the doc tools are in the dev extra: pip install -e '.[dev]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    warnings = [line for line in done.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert done.returncode == 0, "\n".join(warnings) or done.stderr[-4000:]
    assert check_site(tmp_path) == 0


# --- by hand: measuring the drift, checking the built site ---------------------------------------

DRIFT_SETTINGS = {"OPENBLAS_CORETYPE=Haswell": {"OPENBLAS_CORETYPE": "Haswell"},
                  "OPENBLAS_CORETYPE=Sandybridge": {"OPENBLAS_CORETYPE": "Sandybridge"},
                  "MLXTERP_NO_BLAS=1": {"MLXTERP_NO_BLAS": "1"}}


def measure_drift(pages: list[Path], slow: bool) -> None:
    """Run the pages under each BLAS setting; print, per setting, the largest change of a printed
    number beyond one unit of its last digit, relative to its size, and any other difference."""
    for setting, extra in {"default": {}, **DRIFT_SETTINGS}.items():
        worst, where, other = 0.0, "", []
        for page in pages:
            blocks = BLOCKS[page]
            outputs = {b.where: b.output for b in blocks}
            start = time.perf_counter()
            for result in run_page(blocks, slow, env={**environment(), **extra}):
                output = outputs[result["where"]]
                if result["error"] and not (output and RAISED.search(output.text)):
                    other.append(f"{result['where']} failed: {result['error'][-300:]}")
                if output is None:
                    continue
                exp = normalise(output.text, DOCS_HOME)
                act = normalise(result["printed"], str(Path.home()))
                for e, a in zip(exp, act, strict=False):
                    if not same_line(e, a, drift=1.0):  # text or integers differ
                        other.append(f"{result['where']}:\n  - {e}\n  + {a}")
                        continue
                    for en, an in zip(NUMBER.findall(e), NUMBER.findall(a), strict=True):
                        if last_digit(en) and float(en) != 0:
                            excess = max(0.0, abs(float(en) - float(an)) - last_digit(en)) / abs(float(en))
                            if excess > worst:
                                worst, where = excess, f"{result['where']}: {en} printed as {an}"
            print(f"  {setting}: {page_id(page)} {time.perf_counter() - start:.0f} s", file=sys.stderr)
        print(f"{setting}: largest relative drift beyond the last digit {worst:.3g} ({where or 'none'})")
        for line in other:
            print("  other difference:", line)


def check_site(folder: Path) -> int:
    """The built site loads nothing from other hosts: no http(s) URL in a script's src, a
    link's href, an image's or a frame's src."""
    from html.parser import HTMLParser

    found = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attribute = {"script": "src", "link": "href", "img": "src", "iframe": "src"}.get(tag)
            value = dict(attrs).get(attribute) or "" if attribute else ""
            if re.match(r"(?:https?:)?//", value):
                found.append(f"{page}: <{tag} {attribute}={value!r}>")

    pages = sorted(folder.rglob("*.html"))
    for page in pages:
        Tags().feed(page.read_text())
    print("\n".join(found) or f"{len(pages)} pages, nothing loaded from other hosts")
    return 1 if found or not pages else 0


if __name__ == "__main__":
    if sys.argv[1] == "--run":  # the page's subprocess
        execute(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "--drift":  # python tests/test_docs.py --drift [--slow] [PAGE ...]
        chosen = [ROOT / a for a in sys.argv[2:] if a != "--slow"] or list(BLOCKS)
        measure_drift(chosen, slow="--slow" in sys.argv)
    elif sys.argv[1] == "--check-site":  # python tests/test_docs.py --check-site site
        sys.exit(check_site(Path(sys.argv[2])))
