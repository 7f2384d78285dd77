"""The command line: the README's main job prints what the README shows."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from mlxterp.experiments.pipeline.results import PatchingResult
from mlxterp.presentation.cli import main

README = (Path(__file__).parents[1] / "README.md").read_text()


def readme_main_job() -> tuple[list[str], str]:
    """The arguments of the README's `mlxterp patch` command and the output block after it."""
    command = next(line for line in README.splitlines() if ".venv/bin/mlxterp patch" in line)
    args = shlex.split(command.split(".venv/bin/mlxterp", 1)[1])
    output = README.split("into `out/`:\n\n```\n", 1)[1].split("```", 1)[0]
    return args, output


def ranking(text: str) -> list[tuple[str, float]]:
    return [(m[1], float(m[2])) for m in re.finditer(r"^\s+\d+\s+(\S+)\s+(-?[\d.]+)%$", text, re.M)]


def test_readme_main_job(tmp_path, capsys):
    args, expected = readme_main_job()
    out = tmp_path / "out"
    args[args.index("--out") + 1] = str(out)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[:4] == expected.splitlines()[:4]  # prompts, sweep, baseline
    assert printed.splitlines()[4].startswith("float32 noise: each recovery within")
    ours, theirs = ranking(printed), ranking(expected)
    assert [site for site, _ in ours] == [site for site, _ in theirs]
    assert all(abs(a - b) < 0.2 for (_, a), (_, b) in zip(ours, theirs, strict=True))
    result = PatchingResult.from_json(out / "patch-smollm2-135m-mlp-layer-kl.json")
    assert len(result.sites) == 30 and result.metric == "kl"
    assert (out / "patch-smollm2-135m-mlp-layer-kl.png").stat().st_size > 10_000
    saved = json.loads((out / "patch-smollm2-135m-mlp-layer-kl.json").read_text())
    assert saved["component"] == "mlp" and saved["provenance"]["model"] == "smollm2-135m"
    # the same command again, and another model, into the same folder: nothing is overwritten
    assert main(args) == 0
    assert (out / "patch-smollm2-135m-mlp-layer-kl-2.json").exists()


def test_demo_and_doctor(capsys):
    assert main(["demo", "The capital of France is", "--top", "3"]) == 0
    assert "' Paris'" in capsys.readouterr().out.splitlines()[2]
    code = main(["doctor"])
    report = capsys.readouterr().out
    assert "smollm2-135m: installed" in report and "model cache" in report
    assert code == (0 if "fix:" not in report else 1)


def test_patch_reports_bad_input(tmp_path, capsys):
    args = ["patch", "Paris is the capital of France", "The city of London", "--out", str(tmp_path)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("mlxterp patch: error: inputs in one batch must have the same number")
    assert "'The city of London': 4 tokens" in error and "Traceback" not in error
    assert main(["patch", "Paris is", "London is", "--metric", "l3", "--out", str(tmp_path)]) == 2
    assert "unknown metric 'l3'" in capsys.readouterr().err


def test_plot_title_stays_inside_the_figure(tmp_path):
    """The README's IOI pair makes a long title: it wraps instead of running off the canvas."""
    args, _ = readme_main_job()
    out = tmp_path / "out"
    args[args.index("--out") + 1] = str(out)
    assert main(args) == 0
    fig = PatchingResult.from_json(out / "patch-smollm2-135m-mlp-layer-kl.json").plot(out / "again.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    title = fig._suptitle
    box, canvas = title.get_window_extent(renderer), fig.bbox
    assert box.x0 >= canvas.x0 and box.x1 <= canvas.x1 and box.y1 <= canvas.y1
    assert "Mary gave a drink to" in title.get_text().replace("\n", " ")


def test_identical_prompts_are_refused(tmp_path, capsys):
    prompt = "Paris is the capital of France"
    assert main(["patch", prompt, prompt, "--out", str(tmp_path)]) == 2
    assert "same tokens" in capsys.readouterr().err


def test_patch_writes_the_html_report_when_asked(tmp_path, capsys):
    args = ["patch", "The capital of France is", "The capital of Italy is", "--layers", "0,23",
            "--metric", "logit_diff", "--answer", " Paris", "--wrong-answer", " Rome",
            "--out", str(tmp_path), "--html"]
    assert main(args) == 0
    page = tmp_path / "patch-smollm2-135m-mlp-layer-logit_diff.html"
    assert f"report saved to {page}" in capsys.readouterr().out
    assert '"label": "L23"' in page.read_text()
    with pytest.raises(SystemExit):  # argparse's usage error, which names the fix
        main(["patch", "a b", "c d", "--layers", "x,1", "--out", str(tmp_path)])
    assert "give layer numbers separated by commas" in capsys.readouterr().err


@pytest.mark.slow  # over 15 s here: CI's slow round runs it
def test_lens_heads_and_train_lens(tmp_path, capsys, monkeypatch):
    from mlxterp.experiments.analyses.heads import HeadScores
    from mlxterp.experiments.analyses.lenses import LensResult

    monkeypatch.setenv("MLXTERP_CACHE", str(tmp_path / "cache"))  # where train-lens keeps a lens
    prompt = "The Eiffel Tower is located in the city of"
    assert main(["lens", prompt, "--target", " Paris", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("logit lens at position 9 (' of')")
    assert printed[-3].startswith("   29  ' Paris'")  # the last layer, then the two files
    result = LensResult.from_json(tmp_path / "logit-lens-smollm2-135m.json")
    assert result.target == " Paris" and result.target_rank[-1, -1] == 0
    assert (tmp_path / "logit-lens-smollm2-135m.png").stat().st_size > 10_000

    assert main(["lens", prompt, "--tuned", "--out", str(tmp_path)]) == 2
    assert "train one with `mlxterp train-lens --model smollm2-135m`" in capsys.readouterr().err
    assert main(["train-lens", "--steps", "1", "--batch", "1", "--length", "16", "--held-out", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tuned lens saved to" in printed and len(re.findall(r"logit .* tuned", printed)) == 29
    assert main(["lens", prompt, "--tuned", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("tuned lens at position 9")
    assert LensResult.from_json(tmp_path / "tuned-lens-smollm2-135m.json").lens == "tuned"

    assert main(["heads", "--length", "10", "--batch", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:3]] == ["previous", "duplicate", "induction"]
    assert HeadScores.from_json(tmp_path / "heads-smollm2-135m.json").scores.shape == (3, 30, 9)


@pytest.mark.slow  # about 40 s here (the corpus tokenised, the model loaded): CI's slow round runs it
def test_train_sae_saves_measures_and_draws(tmp_path, capsys):
    from mlxterp import load_saelens

    argv = ["train-sae", "--site", "layers.3", "--expansion", "1", "--k", "8", "--steps", "3",
            "--batch-tokens", "64", "--length", "16", "--held-out", "4", "--features", "3",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "topk SAE at model.model.layers.3: 576 -> 576 latents, k=8" in printed
    interval = r"-?\d\.\d+ \[-?\d\.\d+, -?\d\.\d+\]"  # 3 steps: the loss recovered may be below 0
    assert re.search(rf"held-out, 60 tokens: L0 8\.0, FVU {interval}, loss recovered {interval}", printed)
    sae = load_saelens(tmp_path / "sae-smollm2-135m-layers.3-topk")
    assert (sae.d_sae, sae.k, sae.trained_on["steps"]) == (576, 8, 3)
    page = (tmp_path / "sae-smollm2-135m-layers.3-topk-features.html").read_text()
    assert page.count('"feature":') == 3
    assert main(["train-sae", "--site", "layers.99", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "no module matches 'layers.99'" in error and "Traceback" not in error
