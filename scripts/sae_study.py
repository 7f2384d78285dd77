"""The SAE of docs/sae.md: a TopK SAE on SmolLM2-135M's residual stream after block 8 (576 wide,
4,608 latents, k = 32), trained on the Debian documentation corpus, and every number of that page.

    .venv/bin/python scripts/sae_study.py prepare-gpu          # fills .gpu/sae/ (git-ignored)
    python3 scripts/sae_study.py train --model .gpu/sae/model --out $OUT/sae   # on the GPU machine
    .venv/bin/python scripts/sae_study.py train --steps 40 --out test-artifacts/sae-cpu  # CPU throughput
    .venv/bin/python scripts/sae_study.py evaluate --sae docs/img/sae-smollm2-l8 --out docs/img

`prepare-gpu` writes what the GPU machine needs, which reaches no registry and takes 64 MiB a
run: SmolLM2's first 9 blocks (all block 8's residual depends on) in MLX's 4-bit form, an exact
repacking of the GGUF's Q4_1 weights, with the tokenizer; and the corpus, gzipped. `train`
trains and times the plain forward of the same batches. `evaluate` (on the full float32 model)
writes the SAEBench-style metrics on the held-out documents, two feature dashboards and the
summary the page quotes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlxterp  # noqa: E402
from mlxterp import InterpretableModel  # noqa: E402
from mlxterp.experiments.analyses.sae_training import train_sae  # noqa: E402
from mlxterp.experiments.analyses.saes import evaluate_sae, feature_dashboards, frequent_features  # noqa: E402
from mlxterp.experiments.data.activations import collect  # noqa: E402
from mlxterp.experiments.data.corpus import PACKAGES, debian_docs, token_windows  # noqa: E402
from mlxterp.models.load import BUNDLED, cache_dir, converted_folder  # noqa: E402
from mlxterp.models.saelens import load_saelens, save_saelens  # noqa: E402

SITE, LAYERS_NEEDED = "layers.8", 9


def prepare_gpu(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "model").mkdir(parents=True)
    quantized = Path(converted_folder(BUNDLED["smollm2-135m"].gguf_path(cache_dir()), mx.float32, True))
    weights = mx.load(str(quantized / "model.safetensors"))
    kept = {
        name: array
        for name, array in weights.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < LAYERS_NEEDED
    }
    mx.save_safetensors(str(folder / "model" / "model.safetensors"), kept)
    config = json.loads((quantized / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS_NEEDED
    config["quantization"] = {
        key: value
        for key, value in config["quantization"].items()
        if not key.startswith("model.layers.") or int(key.split(".")[2]) < LAYERS_NEEDED
    }
    (folder / "model" / "config.json").write_text(json.dumps(config))
    for file in quantized.iterdir():
        if file.name.startswith("tokenizer") or file.suffix == ".jinja":
            shutil.copy(file, folder / "model" / file.name)
    debian_docs()  # fills the cache
    (folder / "corpus").mkdir()
    for name in PACKAGES:
        source = cache_dir() / "corpus" / f"{name}.jsonl"
        (folder / "corpus" / f"{name}.jsonl.gz").write_bytes(gzip.compress(source.read_bytes()))
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size / 2**20:7.1f} MiB  {path}")


def forward_throughput(model, texts, length: int, windows: int = 32, repeats: int = 5) -> dict:
    """Tokens per second of the plain forward up to the SAE's site, and of the whole model."""
    batch = token_windows(model, texts, length)[:windows]
    site = model.tree.site(SITE)
    result = {}
    for what, run in (
        ("to_site", lambda: collect(model, batch, [site])),
        ("whole_model", lambda: model.model(batch)),
    ):
        mx.eval(run())  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            mx.eval(run())
        result[what] = round(repeats * batch.size / (time.perf_counter() - started))
    return result


def train(args) -> None:
    if args.corpus:  # the gzipped corpus carried to a machine without the registry
        (cache_dir() / "corpus").mkdir(parents=True, exist_ok=True)
        for file in Path(args.corpus).glob("*.jsonl.gz"):
            (cache_dir() / "corpus" / file.name.removesuffix(".gz")).write_bytes(
                gzip.decompress(file.read_bytes())
            )
    base, tokenizer = mlxterp.load(args.model, dtype="float32")
    model = InterpretableModel(base, tokenizer)
    texts, _ = debian_docs()
    started = time.perf_counter()
    sae = train_sae(
        model,
        SITE,
        texts,
        architecture="topk",
        expansion=8,
        k=32,
        steps=args.steps,
        batch_tokens=4096,
        length=128,
        seed=0,
        checkpoint=args.checkpoint or args.out / "checkpoint",
        checkpoint_every=500,
        progress=True,
    )
    seconds = time.perf_counter() - started
    sae.model = "smollm2-135m"  # the 9-block folder is SmolLM2-135M's first 9 blocks, bit for bit
    save_saelens(sae, args.out / "sae")
    timing = {
        "device": str(mx.default_device()),
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "training_tokens_per_second": sae.trained_on["tokens_per_second"],
        "forward_tokens_per_second": forward_throughput(model, texts, 128),
    }
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2))
    print(json.dumps(timing, indent=2))


def evaluate(args) -> None:
    """Held-out metrics, dashboards of the most frequent and of random live features, summary."""
    base, tokenizer = mlxterp.load("smollm2-135m")
    model = InterpretableModel(base, tokenizer)
    sae = load_saelens(args.sae)
    _, held_out = debian_docs()
    windows = token_windows(model, held_out, 128)
    started = time.perf_counter()
    report = evaluate_sae(model, sae, windows[: args.windows], ce_windows=args.ce_windows)
    print(json.dumps(report.to_json(), indent=2), f"({time.perf_counter() - started:.0f} s)")
    frequent = frequent_features(model, sae, windows[:16], 40)
    rng = np.random.default_rng(0)
    others = [int(f) for f in rng.permutation(sae.d_sae) if f not in frequent][:60]
    boards = feature_dashboards(model, sae, windows[: args.windows], features=frequent + others)
    boards.save(args.out / "sae-features.json", overwrite=True)
    boards.to_html(args.out / "sae-features.html", overwrite=True)
    summary = {"evaluation": report.to_json(), "windows": args.windows, "ce_windows": args.ce_windows,
               "held_out_windows": int(len(windows)), "sae": sae.describe(),
               "trained_on": {k: v for k, v in sae.trained_on.items() if k != "history"}}
    (args.out / "sae-study.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("prepare-gpu").add_argument("--out", type=Path, default=Path(".gpu/sae"))
    trainer = verbs.add_parser("train")
    trainer.add_argument("--model", default="smollm2-135m")
    trainer.add_argument("--corpus", help="a folder of gzipped corpus files (prepare-gpu's corpus/)")
    trainer.add_argument("--steps", type=int, default=6000)
    trainer.add_argument("--out", type=Path, required=True)
    trainer.add_argument(
        "--checkpoint", type=Path, help="where the run's checkpoint lives (default OUT/checkpoint)"
    )
    evaluator = verbs.add_parser("evaluate")
    evaluator.add_argument("--sae", type=Path, required=True, help="the trained SAE's folder")
    evaluator.add_argument("--windows", type=int, default=400, help="held-out windows of 128 tokens")
    evaluator.add_argument("--ce-windows", type=int, default=64, help="of them, for the loss recovered")
    evaluator.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    if args.verb == "evaluate":
        evaluate(args)
    elif args.verb == "prepare-gpu":
        prepare_gpu(args.out)
    elif args.verb == "train":
        args.out.mkdir(parents=True, exist_ok=True)
        train(args)


if __name__ == "__main__":
    main()
