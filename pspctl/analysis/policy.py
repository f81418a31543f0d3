"""Moved to pspctl.planning (merge planning sits with the policy, not with analysis); kept so
that `from pspctl.analysis.policy import policy_for_merge` (pspctl/cli/core.py) still works."""

from pspctl.planning import CandidateResult, MeasuredPolicy, measured_policy, policy_for_merge

__all__ = ["CandidateResult", "MeasuredPolicy", "measured_policy", "policy_for_merge"]
