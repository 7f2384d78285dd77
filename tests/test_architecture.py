"""The shape of the code: layers that import only downward, no circles, one set of options with
one default each, and the documented error taxonomy."""

from __future__ import annotations

import ast
import inspect
from dataclasses import fields
from pathlib import Path

import pytest

import mlxterp
from mlxterp import InterpretableModel, SweepOptions, errors
from mlxterp.experiments.analyses import (
    attribution,
    causal_tracing,
    generation,
    heads,
    lenses,
    patching,
    steering,
)

PACKAGE = Path(mlxterp.__file__).parent

# Each module's layer, by its dotted name's longest matching prefix; a module may import only
# from its own layer or those below (a lower number).
LAYERS = {
    "mlxterp.errors": 0, "mlxterp.version": 0, "mlxterp.paths": 0, "mlxterp.blas": 0,
    "mlxterp.models": 1,
    "mlxterp.tracing": 2,
    "mlxterp.interventions": 3,
    "mlxterp.experiments.data": 4,
    "mlxterp.experiments.pipeline": 5,
    "mlxterp.experiments.runners": 6,
    "mlxterp.experiments.analyses": 7,
    "mlxterp.model": 8,
    "mlxterp.presentation": 9,
    "mlxterp": 10,  # the package root: the public API, above everything
}
ANALYSES = (patching.patching_sweep, attribution.attribution_patching, causal_tracing.causal_trace)


def layer(module: str) -> int:
    prefix = max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len)
    return LAYERS[prefix]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every mlxterp module and the mlxterp modules it imports, anywhere in its body."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name, targets = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules()
                            else node.module for alias in node.names}
        found[name] = {t for t in targets if t.startswith("mlxterp") and t != name}
    return found


def modules() -> set[str]:
    return {module_name(path) for path in PACKAGE.rglob("*.py")}


def test_no_import_runs_up_a_layer():
    upward = sorted(f"{source} -> {target}" for source, targets in imports().items() for target in targets
                    if layer(target) > layer(source))
    assert upward == []


def test_no_import_circles():
    graph = {name: {t for t in targets if t in modules() and not t == "mlxterp"}
             for name, targets in imports().items() if name != "mlxterp"}
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_experiments_are_in_rooms():
    rooms = {path.name for path in (PACKAGE / "experiments").iterdir()
             if path.is_dir() and path.name != "__pycache__"}
    assert rooms == {"data", "pipeline", "runners", "analyses"}
    assert not [p.name for p in (PACKAGE / "experiments").glob("*.py") if p.name != "__init__.py"]


def test_one_default_per_option_in_every_method():
    """Every public function's parameter named as a shared option has the option's default, and
    a parameter of the analyses over pairs has one default across them."""
    defaults = {f.name: f.default for f in fields(SweepOptions)}
    # The one exception: a steering vector is read from the residual stream (ActAdd's convention),
    # while the guide fixes "mlp" as patching's component.
    exempt = {("steering_vector", "component"), ("InterpretableModel.steering_vector", "component")}
    for fn in public_functions():
        for name, parameter in inspect.signature(fn).parameters.items():
            if name in defaults and parameter.default is not inspect.Parameter.empty \
                    and (fn.__qualname__, name) not in exempt:
                assert parameter.default == defaults[name], f"{fn.__qualname__}({name}=...)"
    shared: dict[str, object] = {}
    for fn in [*ANALYSES, patching.activation_patching, InterpretableModel.activation_patching]:
        for name, parameter in inspect.signature(fn).parameters.items():
            if parameter.default is not inspect.Parameter.empty and name not in defaults:
                assert shared.setdefault(name, parameter.default) == parameter.default, \
                    f"{fn.__qualname__}({name}=...) differs from another method's default"


def test_no_public_function_takes_more_than_eight_parameters_besides_the_options():
    for fn in ANALYSES:
        named = [name for name, p in inspect.signature(fn).parameters.items()
                 if name != "options" and p.kind is not inspect.Parameter.VAR_KEYWORD]
        assert len(named) <= 8, (fn.__name__, named)


def test_the_same_call_measures_the_same_metric(wrapped):
    clean, corrupted = "The capital of France is", "The capital of Italy is"
    exact = wrapped.patching_sweep(clean, corrupted, layers=[0, 1])
    estimate = wrapped.attribution_patching(clean, corrupted, layers=[0, 1])
    assert exact.metric == estimate.metric == SweepOptions().metric
    assert exact.baseline == pytest.approx(estimate.baseline, rel=1e-5)  # the same quantity measured


def test_one_options_value_serves_every_analysis(wrapped):
    clean, corrupted = "The capital of France is", "The capital of Italy is"
    options = SweepOptions(layers=[0, 1], metric="logit_diff", answer=" Paris", wrong_answer=" Rome")
    by_value = wrapped.patching_sweep(clean, corrupted, options)
    by_keywords = wrapped.patching_sweep(clean, corrupted, layers=[0, 1], metric="logit_diff",
                                         answer=" Paris", wrong_answer=" Rome")
    assert by_value.sites == by_keywords.sites and by_value.metric == "logit_diff"
    assert wrapped.attribution_patching(clean, corrupted, options).sites == by_value.sites
    overridden = wrapped.patching_sweep(clean, corrupted, options, layers=[2])
    assert [s["layer"] for s in overridden.sites] == [2]
    with pytest.raises(mlxterp.InputError, match="causal_trace .* does not use layers, metric, wrong_answer"):
        wrapped.causal_trace("The Eiffel Tower is located in the city of", "The Eiffel Tower", options)


def test_option_errors_say_what_is_wrong():
    with pytest.raises(mlxterp.InputTypeError, match=r"'layer' \(did you mean 'layers'\?\)"):
        SweepOptions.of(None, layer=[3])
    with pytest.raises(ValueError, match="direction='sideways': use 'denoise' or 'noise'"):
        SweepOptions(direction="sideways")
    with pytest.raises(ValueError, match="max_batch=0"):
        SweepOptions(max_batch=0)
    with pytest.raises(TypeError, match="position=1.5"):
        SweepOptions(position=1.5)
    with pytest.raises(ValueError, match="positions= was given but over"):
        SweepOptions(positions=[1])
    assert not issubclass(mlxterp.InputError, mlxterp.SiteError)


def test_the_error_taxonomy():
    classes = [value for value in vars(errors).values() if isinstance(value, type)
               and value.__module__ == errors.__name__ and not value.__name__.startswith("_")]
    for cls in classes:
        assert issubclass(cls, mlxterp.MlxterpError | Warning), cls
        assert cls.__name__ in mlxterp.__all__, f"{cls.__name__} is not exported"
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} is not in the taxonomy"
        if issubclass(cls, mlxterp.InputError):
            assert issubclass(cls, ValueError)
    assert issubclass(mlxterp.SiteError, mlxterp.InputError) and issubclass(mlxterp.InputTypeError, TypeError)


def public_functions() -> list:
    """Every function of the public API, every public method of the wrapper, and the analyses
    its methods delegate to."""
    functions = [value for name in mlxterp.__all__ if inspect.isfunction(value := getattr(mlxterp, name))]
    methods = [fn for name, fn in vars(InterpretableModel).items()
               if inspect.isfunction(fn) and not name.startswith("_")]
    analyses = [*ANALYSES, patching.activation_patching, lenses.logit_lens, heads.detect_heads,
                generation.generate, steering.steering_vector]
    return functions + methods + analyses


@pytest.mark.parametrize("fn", public_functions(), ids=lambda fn: fn.__qualname__)
def test_every_public_function_says_what_it_raises(fn):
    doc = inspect.getdoc(fn)
    assert "Raises:" in doc or "It raises nothing" in doc
