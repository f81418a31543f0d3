"""Analysis of a superposed file: retrieval error in weight and function space, pruning statistics,
and (re-exported from pspctl.planning) the measured merge policy. See docs/analyze.md.

    >>> from pspctl.analysis import analyze
    >>> report = analyze("w.safetensors")          # doctest: +SKIP
    >>> report.contexts[0].output_error            # doctest: +SKIP
"""

from pspctl.analysis.report import SCHEMA, Report
from pspctl.analysis.run import DEFAULT_SPARSITIES, analyze, retrieved_state
from pspctl.planning import MeasuredPolicy, measured_policy

__all__ = [
    "DEFAULT_SPARSITIES",
    "SCHEMA",
    "MeasuredPolicy",
    "Report",
    "analyze",
    "measured_policy",
    "retrieved_state",
]
