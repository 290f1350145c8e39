"""The simulation report: learning-curve plots (PNG, matplotlib) and a markdown table."""

from __future__ import annotations

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    policies = report["policies"]
    scenario = report["scenario"]
    written = []
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for policy, s in policies.items():
        ctr = np.array(s["ctr_by_round"])
        ci = np.array(s["ctr_by_round_ci"])
        rounds = np.arange(1, len(ctr) + 1)
        colour = COLOURS.get(policy)
        ax.plot(rounds, _smooth(ctr), label=policy, color=colour, linewidth=2 if policy == "mabrec" else 1.2)
        ax.fill_between(rounds, _smooth(ctr - ci), _smooth(ctr + ci), color=colour, alpha=0.15, linewidth=0)
    if scenario.get("shift_at") is not None:
        ax.axvline(scenario["shift_at"] + 1, color="black", linestyle=":", linewidth=1)
        ax.text(scenario["shift_at"] + 2, ax.get_ylim()[1] * 0.95, "taste shift", fontsize=8, va="top")
    ax.set_xlabel("round (one visit: a slate of 10)")
    ax.set_ylabel("click-through rate (5-round mean)")
    ax.set_title(
        f"{scenario['users']:,} users x {scenario['rounds']} rounds, mean of {next(iter(policies.values()))['seeds']} seeds, 95% CI"
    )
    ax.legend(fontsize=8, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for policy, s in policies.items():
        regret = np.array(s["cumulative_regret_by_round"])
        ax.plot(
            np.arange(1, len(regret) + 1),
            regret,
            label=policy,
            color=COLOURS.get(policy),
            linewidth=2 if policy == "mabrec" else 1.2,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative regret per user (clicks)")
    ax.set_title("Regret against an oracle that knows every user's taste (lower is better)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{name}-regret.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


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
    return "\n".join(rows)
