"""mlxterp's SAE files checked by SAELens itself, both ways (run by `scripts/check_saelens.sh`,
which makes a virtual environment with sae-lens, torch and mlxterp; CI runs it).

1. SAEs mlxterp writes (TopK, BatchTopK, JumpReLU, a JumpReLU transcoder; and the trained SAE
   of docs/sae.md where its folder is given) are loaded with `SAE.load_from_disk`, and SAELens's
   encodings and reconstructions of SmolLM2's activations at the SAE's site are compared with
   mlxterp's.
2. SAEs SAELens writes (topk, jumprelu, standard, jumprelu_transcoder) are loaded with
   `load_saelens` and compared the same way.

`--write-fixture DIR` also writes part 2's SAEs, small, with their inputs and SAELens's outputs:
tests/fixtures/saelens/, which the test suite compares with mlxterp on machines without SAELens.

Tolerance: float32 matmuls of the same weights by two libraries; the bound is 1e-4 of the
largest magnitude (measured differences: about 1e-6 relative).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.saes import (  # noqa: E402
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from safetensors.numpy import save_file  # noqa: E402

import mlxterp  # noqa: E402
from mlxterp import InterpretableModel, SparseAutoencoder, load_saelens, save_saelens  # noqa: E402
from mlxterp.experiments.data.activations import collect  # noqa: E402

RELATIVE_TOLERANCE = 1e-4
PROMPT = "The kernel schedules each task on one of the CPUs, and the scheduler balances them."


def compare(name: str, ours: SparseAutoencoder, theirs, x: np.ndarray) -> float:
    """The largest difference, relative to the largest magnitude, of latents and reconstructions."""
    with torch.no_grad():
        latents_theirs = theirs.encode(torch.from_numpy(x)).numpy()
        reconstruction_theirs = theirs.decode(torch.from_numpy(latents_theirs)).numpy()
    latents = np.array(ours.encode(mx.array(x)))
    reconstruction = np.array(ours.decode(mx.array(latents)))
    worst = 0.0
    for what, a, b in (
        ("latents", latents, latents_theirs),
        ("reconstruction", reconstruction, reconstruction_theirs),
    ):
        error = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
        worst = max(worst, error)
        print(f"  {name:28s} {what:15s} max |mlxterp - SAELens| / max |SAELens| = {error:.2e}")
    if (latents > 0).sum() == 0:
        raise SystemExit(f"{name}: no latent fired, so nothing was compared; the check is void.")
    return worst


def activations(model, site: str) -> np.ndarray:
    tokens = mx.array([model.tokenizer.encode(PROMPT)])
    (x,) = collect(model, tokens, [model.tree.site(site)])
    return np.array(x[0, 1:].astype(mx.float32))


def saelens_made(seed: int, d_in: int, d_out: int) -> dict:
    """SAELens SAEs of each architecture mlxterp reads, with random weights (seeded)."""
    torch.manual_seed(seed)
    made = {
        "topk": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=64, k=8)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=64)),
        "standard": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64)),
        "jumprelu_transcoder": JumpReLUTranscoder(
            JumpReLUTranscoderConfig(d_in=d_in, d_out=d_out, d_sae=64, apply_b_dec_to_input=False)
        ),
    }
    with torch.no_grad():
        for sae in made.values():
            sae.b_enc.copy_(torch.randn_like(sae.b_enc) * 0.1)
            sae.b_dec.copy_(torch.randn_like(sae.b_dec) * 0.1)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.05)
    for sae in made.values():
        sae.cfg.metadata.model_name = "smollm2-135m"
        sae.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    made["jumprelu_transcoder"].cfg.metadata.hook_name = "model.layers.3.mlp:input"
    made["jumprelu_transcoder"].cfg.metadata.hook_name_out = "model.layers.3.mlp"
    return made


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trained", type=Path, help="the trained SAE's folder (docs/sae.md), if at hand")
    parser.add_argument("--write-fixture", type=Path, help="write SAELens-made SAEs for the tests here")
    args = parser.parse_args()
    base, tokenizer = mlxterp.load("smollm2-135m")
    model = InterpretableModel(base, tokenizer)
    worst = 0.0
    print("mlxterp's files, read by SAELens:")
    with tempfile.TemporaryDirectory() as folder:
        ours = {
            architecture: SparseAutoencoder.create(
                "layers.3", 576, 256, architecture, k=16, seed=1, model="smollm2-135m"
            )
            for architecture in ("topk", "batchtopk", "jumprelu")
        }
        ours["jumprelu transcoder"] = SparseAutoencoder.create(
            "layers.3.mlp:input",
            576,
            256,
            "jumprelu",
            site_out="layers.3.mlp",
            d_out=576,
            seed=1,
            model="smollm2-135m",
        )
        for sae in ours.values():
            sae.b_enc = mx.random.normal(sae.b_enc.shape, key=mx.random.key(2)) * 0.1
            if "threshold" in sae:
                sae.threshold = mx.full(sae.threshold.shape, 0.05)
        if args.trained:
            ours["trained (docs/sae.md)"] = load_saelens(args.trained)
        for name, sae in ours.items():
            path = save_saelens(sae, Path(folder) / name.replace(" ", "-").replace("/", "-"))
            theirs = SAE.load_from_disk(str(path))
            worst = max(worst, compare(name, sae, theirs, activations(model, sae.site)))
    print("SAELens's files, read by mlxterp:")
    with tempfile.TemporaryDirectory() as folder:
        for name, theirs in saelens_made(0, 576, 576).items():
            path = Path(args.write_fixture or folder) / name
            theirs.save_model(str(path))
            ours = load_saelens(path)
            x = activations(model, ours.site)
            worst = max(worst, compare(name, ours, theirs, x))
            if args.write_fixture:
                with torch.no_grad():
                    latents = theirs.encode(torch.from_numpy(x)).numpy()
                    reconstruction = theirs.decode(torch.from_numpy(latents)).numpy()
                save_file(
                    {"x": x, "latents": latents, "reconstruction": reconstruction},
                    str(path / "saelens_outputs.safetensors"),
                )
    print(f"worst relative difference {worst:.2e} (bound {RELATIVE_TOLERANCE:g})")
    if worst > RELATIVE_TOLERANCE:
        raise SystemExit("mlxterp and SAELens disagree beyond float32 tolerance")


if __name__ == "__main__":
    main()
