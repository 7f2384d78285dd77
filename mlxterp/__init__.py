"""mlxterp: mechanistic interpretability on MLX.

Everything a user needs is imported from here; the folders below are the layers of the code
(docs/architecture.md), not the API.

Example:
    >>> import mlxterp
    >>> from mlxterp import InterpretableModel, SweepOptions, interventions as iv
    >>> model = InterpretableModel(*mlxterp.load("smollm2-135m"))
"""

import os

# First, before anything imports mlx: on Linux, arms the OpenBLAS preload (see mlxterp/blas.py).
from mlxterp import blas as _blas  # noqa: I001
from mlxterp.version import __version__  # noqa: F401

# transformers warns at import that torch is missing; mlxterp only uses its tokenizers.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Float32 means float32: MLX otherwise runs float32 matrix products on tensor cores as TF32, but
# not matrix-vector ones, so one row alone and the same row in a batch differ by ~1e-3 (an H200:
# KL values of a patching sweep moved 230x past their float32 noise floor; docs/performance.md).
# MLX reads this once, at its first such product; set MLX_ENABLE_TF32=1 yourself to opt in.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from mlxterp import (
    interventions,  # noqa: E402
    presentation,  # noqa: E402, F401  (registers how results are drawn)
)
from mlxterp.blas import blas_status  # noqa: E402
from mlxterp.errors import (  # noqa: E402
    AttentionCaptureError,
    BaselineError,
    DisconnectedCircuitWarning,
    GenerationError,
    GradientError,
    GraphError,
    InputError,
    InputTypeError,
    InstalledInterventionError,
    InterventionError,
    LayerIndexError,
    LensError,
    MetricError,
    MlxterpError,
    ModelLoadError,
    NoisyBaselineWarning,
    NotReachedError,
    NotRecordedError,
    OutputPathError,
    PairBaselineWarning,
    RankFailedError,
    ResultFormatError,
    RoutingError,
    SAEError,
    SiteError,
    SlowBlasWarning,
    SteeringVectorError,
    TraceError,
    UnknownModuleError,
)
from mlxterp.experiments.analyses.attribution import verify_top  # noqa: E402
from mlxterp.experiments.analyses.causal_tracing import (  # noqa: E402
    TokenClassSummary,
    answered_facts,
    token_class_summary,
)
from mlxterp.experiments.analyses.circuits import (  # noqa: E402
    Circuit,
    edge_attribution,
    edge_patching,
    faithfulness_curve,
    top_circuit,
)
from mlxterp.experiments.analyses.experts import (  # noqa: E402
    RoutingStatistics,
    expert_attribution,
    expert_site,
    routing_statistics,
)
from mlxterp.experiments.analyses.generation import Generation  # noqa: E402
from mlxterp.experiments.analyses.heads import HeadScores  # noqa: E402
from mlxterp.experiments.analyses.lenses import LensResult  # noqa: E402
from mlxterp.experiments.analyses.sae_training import train_sae  # noqa: E402
from mlxterp.experiments.analyses.saes import (  # noqa: E402
    FeatureDashboards,
    SAEEvaluation,
    error_site,
    evaluate_sae,
    feature_dashboards,
    feature_site,
    frequent_features,
)
from mlxterp.experiments.analyses.steering import SteeringVector  # noqa: E402
from mlxterp.experiments.analyses.tuned_lens import TunedLens, train_tuned_lens  # noqa: E402
from mlxterp.experiments.data.corpus import debian_docs, token_windows  # noqa: E402
from mlxterp.experiments.data.corruption import Ablate, Noise  # noqa: E402
from mlxterp.experiments.data.pairs import (  # noqa: E402
    Fact,
    PromptPair,
    ioi_pairs,
    load_facts,
    load_pairs,
    save_pairs,
)
from mlxterp.experiments.pipeline.options import SweepOptions  # noqa: E402
from mlxterp.experiments.pipeline.results import PatchingResult  # noqa: E402
from mlxterp.experiments.pipeline.sweep import answered_pairs  # noqa: E402
from mlxterp.model import InterpretableModel  # noqa: E402
from mlxterp.models import BUNDLED, cache_dir, load  # noqa: E402
from mlxterp.models.load import converted_folder  # noqa: E402
from mlxterp.models.sae import SparseAutoencoder  # noqa: E402
from mlxterp.models.saelens import load_saelens, save_saelens  # noqa: E402
from mlxterp.tracing.names import Site, SiteGroup  # noqa: E402

__all__ = [
    # models and the wrapper
    "load", "BUNDLED", "cache_dir", "converted_folder", "blas_status", "InterpretableModel",
    # tracing and interventions
    "interventions", "Site", "SiteGroup",
    # experiments: options, data, results
    "SweepOptions", "PromptPair", "Fact", "ioi_pairs", "answered_pairs", "load_pairs", "save_pairs",
    "Noise", "Ablate", "load_facts", "answered_facts", "token_class_summary", "TokenClassSummary",
    "PatchingResult", "verify_top", "LensResult", "TunedLens", "train_tuned_lens",
    "HeadScores", "SteeringVector", "Generation",
    # circuits
    "edge_attribution", "edge_patching", "top_circuit", "faithfulness_curve", "Circuit",
    # mixtures of experts
    "expert_site", "expert_attribution", "routing_statistics", "RoutingStatistics",
    # sparse autoencoders
    "SparseAutoencoder", "load_saelens", "save_saelens", "train_sae", "debian_docs", "token_windows",
    "feature_site", "error_site", "evaluate_sae", "SAEEvaluation", "feature_dashboards",
    "frequent_features", "FeatureDashboards",
    # errors and warnings
    "MlxterpError", "InputError", "InputTypeError", "SiteError", "MetricError", "BaselineError",
    "ModelLoadError", "OutputPathError", "InterventionError", "InstalledInterventionError",
    "AttentionCaptureError", "SteeringVectorError", "GenerationError", "LensError",
    "ResultFormatError", "UnknownModuleError", "NotRecordedError", "LayerIndexError", "TraceError",
    "NotReachedError", "RankFailedError", "GradientError", "NoisyBaselineWarning", "PairBaselineWarning",
    "SlowBlasWarning", "GraphError", "DisconnectedCircuitWarning", "SAEError", "RoutingError",
    "__version__",
]

_blas.warn_if_slow()
