"""Analysis of learned updates ΔW: spectra, ranks, subspace similarity, amplification, plots.

Analyzing a run is one call on its method's layers::

    spectra, ranks, summary = analyze_layers(method.delta_weights(model), run="r8-seed0", method="lora")
    write_report("out/", spectra, ranks, summary)

``peftlab analyze PATH...`` (:func:`peftlab.analysis.cli.analyze_main`) does the
same for peftlab run directories and for LoRA adapters saved by HF peft.
"""
from peftlab.analysis.amplification import amplification, amplification_table
from peftlab.analysis.plots import (
    layer_index,
    learn_forget_point,
    module_kind,
    plot_effective_rank_by_layer,
    plot_learn_vs_forget,
    plot_similarity_heatmap,
    plot_spectra,
)
from peftlab.analysis.ranks import effective_rank, energy_rank, nominal_rank, rank_summary, stable_rank
from peftlab.analysis.report import analyze_layers, analyze_update, write_report, write_similarity
from peftlab.analysis.similarity import compare_runs, subspace_similarity
from peftlab.analysis.spectra import singular_triplets, singular_values

__all__ = [
    "amplification",
    "amplification_table",
    "analyze_layers",
    "analyze_update",
    "compare_runs",
    "effective_rank",
    "energy_rank",
    "layer_index",
    "learn_forget_point",
    "module_kind",
    "nominal_rank",
    "plot_effective_rank_by_layer",
    "plot_learn_vs_forget",
    "plot_similarity_heatmap",
    "plot_spectra",
    "rank_summary",
    "singular_triplets",
    "singular_values",
    "stable_rank",
    "subspace_similarity",
    "write_report",
    "write_similarity",
]
