"""The measured merge policy against the default rule, on the bundled sample models.

For each context kind, merges samples/models/digits_{0..3}.pt with the default rule and
with `--policy measured` at a few `--max-drop` budgets, and prints a markdown table of
what got superposed, the storage ratio, and the retrieved test accuracy (mean and worst
drop over the 4 contexts). docs/analyze.md quotes its output.

    python benchmarks/measured_policy_samples.py
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pspctl.analysis.policy import policy_for_merge  # noqa: E402
from pspctl.demo import evaluate_retrieved  # noqa: E402
from pspctl.merge import MergeOptions, merge  # noqa: E402
from pspctl.policy import SHAPE_RULES  # noqa: E402
from pspctl.task import load_task  # noqa: E402

TASK = str(ROOT / "samples" / "digits_task.py")
MODELS = [ROOT / "samples" / "models" / f"digits_{i}.pt" for i in range(4)]
BUDGETS = (0.5, 2.0, 5.0)


def main() -> None:
    task = load_task(TASK)
    print("| kind | policy | superposed | storage ratio | test acc. drop, mean | worst |")
    print("|---|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("binary", "complex", "rotation", "onepower"):
            base = MergeOptions(kind=kind, task=TASK, force=True, base="none", policy=SHAPE_RULES)
            runs = [("default rule", base)]
            for budget in BUDGETS:
                policy, _ = policy_for_merge(MODELS, base, max_drop=budget)
                runs.append((f"measured, --max-drop {budget:g}", replace(base, policy=policy)))
            for label, options in runs:
                out = Path(tmp) / f"{kind}.safetensors"
                report = merge(MODELS, out, options)
                drops = [o - r for o, r in evaluate_retrieved(out, task, MODELS)]
                names = [d.name for d in report.decisions if d.role.value == "superposed"]
                print(
                    f"| {kind} | {label} | {', '.join(names) or '–'} | {report.storage_ratio:.2f}× "
                    f"| {sum(drops) / len(drops):+.2f} | {max(drops):+.2f} |"
                )


if __name__ == "__main__":
    main()
