"""The examples run as users run them, and print what a direct computation gives."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxterp import interventions as iv

ROOT = Path(__file__).resolve().parents[1]
PATCHING_EXAMPLE = ROOT / "examples" / "activation_patching_example.py"
CLEAN = "The capital of France is"
CORRUPTED = "The capital of Italy is"
PERCENT = r"(-?\d+\.\d)% recovery"


@pytest.fixture(scope="module")
def patching_output() -> str:
    result = subprocess.run([sys.executable, str(PATCHING_EXAMPLE)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_patching_example_reports_every_layer(patching_output):
    baseline = re.search(r"^Logit difference: clean (-?\d+\.\d+), corrupted (-?\d+\.\d+)$",
                         patching_output, re.M)
    assert baseline and float(baseline[1]) > 0 > float(baseline[2])  # each run prefers its answer
    layers = re.findall(rf"^Layer +(\d+): +{PERCENT}$", patching_output, re.M)
    assert [int(layer) for layer, _ in layers] == list(range(30))
    values = {int(layer): float(value) for layer, value in layers}
    assert all(math.isfinite(v) for v in values.values())
    assert len(set(values.values())) > 10  # not one number repeated

    top = re.findall(rf"^  Layer +(\d+): +{PERCENT}$", patching_output, re.M)
    assert len(top) == 5
    assert [float(v) for _, v in top] == sorted(values.values(), reverse=True)[:5]
    assert all(values[int(layer)] == float(v) for layer, v in top)


def test_patching_example_matches_a_direct_computation(patching_output, wrapped):
    """Layer 10 (whole MLP, and last position only) recomputed the guide's way."""
    model = wrapped
    paris, rome = (model.tokenizer.encode(t, add_special_tokens=False)[0] for t in (" Paris", " Rome"))

    def ld(output):
        return (output[0, -1, paris] - output[0, -1, rome]).item()

    with model.trace(CLEAN) as trace:
        clean_output = model.output.save()
        clean_mlp = trace.activations["model.model.layers.10.mlp"]
    with model.trace(CORRUPTED):
        corrupted_output = model.output.save()

    def selective_patch(corrupted_activation):
        patched = mx.array(corrupted_activation)
        patched[0, -1, :] = clean_mlp[0, -1, :]
        return patched

    expected = {}
    for label, patch in (("whole", iv.replace_with(clean_mlp)), ("last", selective_patch)):
        with model.trace(CORRUPTED, interventions={"layers.10.mlp": patch}):
            patched = model.output.save()
        expected[label] = ((ld(patched) - ld(corrupted_output))
                           / (ld(clean_output) - ld(corrupted_output)) * 100)

    clean_printed = re.search(r"^Logit difference: clean (\S+),", patching_output, re.M)[1]
    layer10 = re.search(rf"^Layer 10: +{PERCENT}$", patching_output, re.M)[1]
    last = re.search(rf"^Layer 10 MLP, last position only: {PERCENT}$", patching_output, re.M)[1]
    assert float(clean_printed) == pytest.approx(ld(clean_output), abs=0.01)
    assert float(layer10) == pytest.approx(expected["whole"], abs=0.1)
    assert float(last) == pytest.approx(expected["last"], abs=0.1)
    assert abs(expected["whole"] - expected["last"]) > 1  # the two patches differ


def run_first_block(path: Path, folder: Path, monkeypatch) -> tuple[str, dict]:
    """The first Python block of a Markdown file, run as written in `folder`; (code, its names)."""
    code = path.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(folder)
    scope: dict = {}
    exec(compile(code, str(path.relative_to(ROOT)), "exec"), scope)
    return code, scope


def claimed(code: str, expression: str):
    """The value a `# ...` comment claims for `expression` on its line of `code`."""
    return eval(re.search(rf"^{re.escape(expression)} +# (.*)$", code, re.M)[1])


def assert_top(result, claim) -> None:
    """Printed to one decimal, so equal within 0.05."""
    for (label, value), (label_claimed, value_claimed) in zip(result.top(len(claim)), claim, strict=True):
        assert label == label_claimed and value == pytest.approx(value_claimed, abs=0.05)


def test_readme_code_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    """The README's opening block (in a scratch folder, for its files)."""
    code, scope = run_first_block(ROOT / "README.md", tmp_path, monkeypatch)
    assert_top(scope["result"], claimed(code, "result.top(3)"))
    assert (tmp_path / "capital-mlp.pdf").exists() and (tmp_path / "capital-mlp.html").exists()
    assert scope["estimate"].method == "atp"


def test_attribution_doc_code_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    code, scope = run_first_block(ROOT / "docs" / "attribution.md", tmp_path, monkeypatch)
    estimate, exact = scope["estimate"], scope["exact"]
    assert_top(estimate, claimed(code, "estimate.top(3)"))
    assert exact.method == "exact" and len(exact.sites) == 5
    # Both sides rounded to one decimal: one step (0.1) apart where noise crosses a rounding edge.
    assert exact.mean.round(1).tolist() == pytest.approx(claimed(code, "exact.mean.round(1).tolist()"),
                                                        abs=0.11)
    assert scope["ig"].method == "ig"


@pytest.mark.slow  # over 15 s here: CI's slow round runs it
def test_causal_tracing_doc_code_runs(tmp_path, monkeypatch):
    """docs/causal-tracing.md's first block: the MLP windows at the subject's ' iffel' token
    carry the fact (the largest effect restores most of P(' Paris'), 0.70 clean)."""
    _, scope = run_first_block(ROOT / "docs" / "causal-tracing.md", tmp_path, monkeypatch)
    result = scope["result"]
    # format 3: the answers of each noise sample (a pair), [answer, wrong_answer]; prob has no wrong one
    assert result.metric == "prob" and result.answer_tokens == [[" Paris", None]] * len(result.clean)
    assert result.effect.mean(axis=0).max() > 0.3
    assert "'iffel'" in result.top(1)[0][0] and (tmp_path / "eiffel-mlp.png").exists()


def test_lenses_doc_code_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    code, scope = run_first_block(ROOT / "docs" / "lenses.md", tmp_path, monkeypatch)
    result, heads = scope["result"], scope["heads"]
    assert result.top_tokens[-1][-1][:3] == claimed(code, "result.top_tokens[-1][-1][:3]")
    assert result.target_rank[-4:, -1].tolist() == claimed(code, "result.target_rank[-4:, -1].tolist()")
    assert scope["pattern"].shape == (1, 9, 10, 10) and (tmp_path / "eiffel-lens.png").exists()
    for (head, score), (head_claimed, score_claimed) in zip(
            heads.top("induction", 2), claimed(code, 'heads.top("induction", 2)'), strict=True):
        assert head == head_claimed and score == pytest.approx(score_claimed, abs=0.005)


@pytest.mark.slow
def test_steering_doc_code_runs(tmp_path, monkeypatch):
    """docs/steering.md's first block: plain generation, a steered and an ablated one that
    differ from it, and the saved vector read back."""
    _, scope = run_first_block(ROOT / "docs" / "steering.md", tmp_path, monkeypatch)
    plain, steered, ablated = scope["plain"], scope["steered"], scope["ablated"]
    assert len(plain.prompt_tokens) == 6 and len(plain.tokens) == 16
    assert steered.tokens != plain.tokens and ablated.tokens != plain.tokens
    assert scope["same"].layer == 8 and scope["same"].width == 576
    assert mx.array_equal(scope["same"].vector, scope["wedding"].vector)
