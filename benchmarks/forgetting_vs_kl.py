"""What a drift budget has cost in forgetting: the NLL change on general text and the accuracy lost on a task no run
trained on, against the forward KL, over every `minorsft-trl compare` result this project has committed.

    python benchmarks/forgetting_vs_kl.py   # reads benchmarks/results/compare_*/**/results.json, in seconds

Writes `benchmarks/results/forgetting_vs_kl.{md,json,png}` (`minorsft_trl.drift.forgetting`).
"""

import json
from pathlib import Path

from minorsft_trl.drift import forgetting
from minorsft_trl.drift.report import save

RESULTS = Path("benchmarks/results")
BUDGETS = (0.25, 0.5, 1.0)


def main() -> None:
    files = sorted(RESULTS.glob("compare_*/**/results.json"))
    points = forgetting.points_of(files)
    text, payload = forgetting.report(points, BUDGETS)
    (RESULTS / "forgetting_vs_kl.md").write_text(text)
    (RESULTS / "forgetting_vs_kl.json").write_text(json.dumps(payload, indent=1))
    save(forgetting.figure(points, BUDGETS), RESULTS / "forgetting_vs_kl.png")
    print(text)


if __name__ == "__main__":
    main()
