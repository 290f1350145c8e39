"""The simulation report: learning-curve plots (PNG, matplotlib) and a markdown table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {
    "mabrec": "#d62728",
    "original": "#7f7f7f",
    "popularity": "#1f77b4",
    "epsilon-greedy": "#17becf",
    "ucb1": "#2ca02c",
    "random": "#bcbd22",
}


def _smooth(values: np.ndarray, window: int = 5) -> np.ndarray:
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plots(report: dict[str, Any], out: Path, name: str = "ctr") -> list[Path]:
    """`<name>.png` (CTR by round, with 95% bands) and `<name>-regret.png` (cumulative regret)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    policies, scenario = report["policies"], report["scenario"]
    seeds = next(iter(policies.values()))["seeds"]

    def figure(path: Path, title: str, xlabel: str, ylabel: str, draw: Callable[[Any], None]) -> Path:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        draw(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=3)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    def style(policy: str) -> dict[str, Any]:
        return {"label": policy, "color": COLOURS.get(policy), "linewidth": 2 if policy == "mabrec" else 1.2}

    def ctr(ax: Any) -> None:
        for policy, s in policies.items():
            mean, ci = np.array(s["ctr_by_round"]), np.array(s["ctr_by_round_ci"])
            rounds = np.arange(1, len(mean) + 1)
            ax.plot(rounds, _smooth(mean), **style(policy))
            ax.fill_between(
                rounds, _smooth(mean - ci), _smooth(mean + ci), color=COLOURS.get(policy), alpha=0.15, linewidth=0
            )
        if scenario.get("shift_at") is not None:
            ax.axvline(scenario["shift_at"] + 1, color="black", linestyle=":", linewidth=1)
            ax.text(scenario["shift_at"] + 2, ax.get_ylim()[1] * 0.95, "taste shift", fontsize=8, va="top")

    def regret(ax: Any) -> None:
        for policy, s in policies.items():
            values = np.array(s["cumulative_regret_by_round"])
            ax.plot(np.arange(1, len(values) + 1), values, **style(policy))

    return [
        figure(
            out / f"{name}.png",
            f"{scenario['users']:,} users x {scenario['rounds']} rounds, mean of {seeds} seeds, 95% CI",
            "round (one visit: a slate of 10)",
            "click-through rate (5-round mean)",
            ctr,
        ),
        figure(
            out / f"{name}-regret.png",
            "Regret against an oracle that knows every user's taste (lower is better)",
            "round",
            "cumulative regret per user (clicks)",
            regret,
        ),
    ]


def table(report: dict[str, Any]) -> str:
    lifts = report.get("lifts", {})
    rows = [
        "| policy | clicks/user, rounds 1-100 | clicks/user, all rounds | CTR | cold start CTR (rounds 1-5) | regret | coverage | diversity | empty slates | mabrec's lift |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ci(pair: list[float], digits: int = 2) -> str:
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    for policy, s in sorted(report["policies"].items(), key=lambda kv: -kv[1]["clicks_per_user_all_rounds"][0]):
        lift = lifts.get(policy)
        lift_text = "" if lift is None else f"{lift['rounds_1_100']:+.0%} (1-100), {lift['all_rounds']:+.0%} (all)"
        rows.append(
            f"| {policy} | {ci(s['clicks_per_user_rounds_1_100'])} | {ci(s['clicks_per_user_all_rounds'])} | {ci(s['ctr'], 3)} |"
            f" {ci(s['cold_start_ctr_rounds_1_5'], 3)} | {ci(s['cumulative_regret'], 1)} | {s['coverage'][0]:.1%} | {s['diversity'][0]:.2f} |"
            f" {s['empty_slates']} | {lift_text} |"
        )
    shift = {p: s["shift"] for p, s in report["policies"].items() if "shift" in s}
    if shift:
        rows += [
            "",
            "| policy | pre-shift CTR | lowest CTR after | rounds to 80% of pre-shift CTR |",
            "|---|---|---|---|",
        ]
        for policy, s in shift.items():
            rows.append(
                f"| {policy} | {s['pre_shift_ctr']:.3f} | {s['lowest_after']:.3f} | {s['rounds_to_80_percent']} |"
            )
    return "\n".join(rows + ["", coherence_table(report)])


def coherence_table(report: dict[str, Any]) -> str:
    """Per policy and measure, the mean by the user's clicks so far (see runner.Coherence)."""
    from sim.runner import EVIDENCE

    groups = [f"{lo}" if hi == lo + 1 else (f"{lo}+" if hi > 10**6 else f"{lo}-{hi - 1}") for lo, hi in EVIDENCE]
    rows = [
        "Slate to slate, by the user's clicks so far: the share of the slate in their most clicked genres"
        " (follows), how far its genre mix moved from their previous slate's (swing), and the share of"
        " movies it repeats from it (overlap).",
        "",
        "| policy | measure | " + " | ".join(f"{g} clicks" for g in groups) + " |",
        "|---|---|" + "---|" * len(groups),
    ]
    for policy, s in report["policies"].items():
        for measure, values in s.get("coherence", {}).items():
            cells = " | ".join("" if v is None else f"{v:.2f}" for v in values)
            rows.append(f"| {policy} | {measure} | {cells} |")
    return "\n".join(rows)
