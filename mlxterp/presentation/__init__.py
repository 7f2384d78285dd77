"""Layer 5: tables, plots, the HTML report and the command line. They read results and never
compute.

Results (`PatchingResult.plot`, `.to_html`, `LensResult.plot`, `HeadScores.plot`) are drawn by the
functions registered here in `results.VIEWS`: the experiments layer holds data and never imports
what draws it.
"""

from mlxterp.experiments.pipeline.results import VIEWS
from mlxterp.presentation import circuits, features, plots, report

VIEWS.update(patching=circuits.plot_any_patching, html=report.write_html, lens=plots.plot_lens,
             heads=plots.plot_heads, routing=plots.plot_routing, circuit=circuits.plot_circuit,
             circuit_html=circuits.write_circuit_html, features_html=features.write_features_html)
