"""The report's figure: one panel per case, each provider's speed relative to the case's first
baseline (bars), with the p20-p80 spread as error bars and the targets as dashed lines."""

from __future__ import annotations

from pathlib import Path


def plot_report(cases_and_results, title: str, path: Path) -> None:
    """cases_and_results: [(Case, {provider name: Measurement})]; writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [(case, results) for case, results in cases_and_results if case.baselines]
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 1.0 + 0.5 * sum(len(r) + 2 for _, r in panels)),
                                squeeze=False)
    for axis, (case, results) in zip(axes[:, 0], panels):
        baseline = results[case.baselines[0]].median
        names = list(results)
        speedups = [baseline / results[name].median for name in names]
        # a slower run (p80 time) is a lower speedup
        lower = [s - baseline / results[n].percentile(0.8) for s, n in zip(speedups, names)]
        upper = [baseline / results[n].percentile(0.2) - s for s, n in zip(speedups, names)]
        colors = ["tab:gray" if name in case.baselines else "tab:blue" for name in names]
        axis.barh(names, speedups, xerr=[lower, upper], color=colors, capsize=3)
        for target in case.targets:
            if target.baseline == case.baselines[0]:
                axis.axvline(target.min_speedup, color="tab:red", linestyle="--", linewidth=1)
        for y, (speedup, above) in enumerate(zip(speedups, upper)):
            axis.text(speedup + above, y, f"  {speedup:.2f}x", va="center", fontsize=8)
        axis.invert_yaxis()
        axis.set_title(f"[{case.suite}] {case.name}", fontsize=10, loc="left")
        axis.set_xlabel(f"speed relative to {case.baselines[0]} (higher is faster; red: target)", fontsize=8)
        axis.tick_params(labelsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
