"""Analysis of a superposed file: retrieval error in weight and function space, pruning statistics,
and the measured merge policy. See docs/analyze.md.

    >>> from pspctl.analysis import analyze
    >>> report = analyze("w.safetensors")          # doctest: +SKIP
    >>> report.contexts[0].output_error            # doctest: +SKIP
"""

from pspctl.analysis.policy import MeasuredPolicy, measured_policy
from pspctl.analysis.report import SCHEMA, Report
from pspctl.analysis.run import DEFAULT_SPARSITIES, analyze, retrieved_state

__all__ = [
    "DEFAULT_SPARSITIES",
    "SCHEMA",
    "MeasuredPolicy",
    "Report",
    "analyze",
    "measured_policy",
    "retrieved_state",
]
