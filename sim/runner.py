"""`mabrec simulate`: every policy against the same synthetic users, for several seeds.

One run is (policy, seed, scenario): a World drawn from the seed (the same users for every
policy), `rounds` visits per user, the metrics of each round. Runs go in parallel over the
machine's cores. Results: per policy and round, the mean over seeds and a 95% confidence
interval (1.96 standard errors of the seeds' means); summaries; mabrec's lifts over the others;
and how coherent consecutive slates look to a person, as a function of the user's clicks so far.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from sim import POLICIES, policies
from sim.world import World, WorldConfig
from system.core.catalog import Catalog
from system.core.catalog_file import SHIPPED, read_movies
from system.core.policy_config import PolicyConfig


@dataclass(frozen=True)
class Scenario:
    users: int = 1000
    rounds: int = 200
    shift_at: int | None = None  # re-draw every user's genre tastes at this round
    world: WorldConfig = field(default_factory=WorldConfig)


@cache
def shipped_catalog() -> Catalog:
    return Catalog.from_movies(list(read_movies(SHIPPED)))


# Users are grouped by their clicks so far (slate and catalog clicks): [lo, hi) per group.
EVIDENCE = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 10**9))
COHERENCE = ("follows", "swing", "overlap")


class Coherence:
    """What a person sees from one slate to the next, per user, by their clicks so far:
    - follows: the share of the slate's movies in a genre the user clicked most (their two
      most clicked genres, ties included): how much of it follows their clear tastes;
    - swing: how far the slate's genre mix moved from their previous slate's (total variation
      distance of the two genre distributions: 0 the same mix, 1 nothing in common);
    - overlap: the share of the slate's movies that were in their previous slate."""

    def __init__(self, genres: np.ndarray, users: int) -> None:
        self.genres = genres  # movies x genres, 0/1
        self.clicks = np.zeros((users, genres.shape[1]))  # per user, clicks per genre
        self.count = np.zeros(users, dtype=np.int64)  # per user, clicks
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # (slates, genre mixes)
        self.sums = np.zeros((len(EVIDENCE), len(COHERENCE)))
        self.n = np.zeros((len(EVIDENCE), len(COHERENCE)))

    def see(self, slates: np.ndarray) -> None:
        """A round's slates (users x SLATE movie indices, -1 padding), before the users react."""
        real = slates >= 0
        members = self.genres[np.maximum(slates, 0)] * real[:, :, None]  # users x slate x genres
        mix = members.sum(axis=1)
        mix /= np.maximum(mix.sum(axis=1, keepdims=True), 1e-12)
        sizes = np.maximum(real.sum(axis=1), 1)
        top = np.sort(self.clicks, axis=1)[:, -2][:, None]  # the second-highest genre count
        favourite = (self.clicks >= np.maximum(top, 1)) & (self.clicks > 0)
        follows = ((members * favourite[:, None, :]).sum(axis=2) > 0).sum(axis=1) / sizes
        group = np.searchsorted([hi for _, hi in EVIDENCE], self.count, side="right")
        has_taste = self.count > 0
        self._add(group[has_taste], 0, follows[has_taste])
        if self.previous is not None:
            before, before_mix = self.previous
            swing = 0.5 * np.abs(mix - before_mix).sum(axis=1)
            overlap = ((slates[:, :, None] == before[:, None, :]) & real[:, :, None]).any(axis=2).sum(axis=1) / sizes
            self._add(group, 1, swing)
            self._add(group, 2, overlap)
        self.previous = slates, mix

    def clicked(self, users: np.ndarray, movies: np.ndarray) -> None:
        self.clicks[users] += self.genres[movies]
        np.add.at(self.count, users, 1)

    def _add(self, group: np.ndarray, metric: int, values: np.ndarray) -> None:
        np.add.at(self.sums[:, metric], group, values)
        np.add.at(self.n[:, metric], group, 1)

    def result(self) -> dict[str, list[float | None]]:
        means = np.divide(self.sums, self.n, out=np.full_like(self.sums, np.nan), where=self.n > 0)
        return {name: [None if np.isnan(v) else float(v) for v in means[:, i]] for i, name in enumerate(COHERENCE)}


def run_one(name: str, seed: int, scenario: Scenario, config: PolicyConfig | None = None) -> dict[str, Any]:
    """One policy, one seed: per-round metrics (over users). `config` tunes mabrec's policy."""
    catalog = shipped_catalog()
    world = World(catalog, scenario.users, seed, scenario.world)
    policy = policies.make(name, catalog, seed + 7919, config)
    rounds, users = scenario.rounds, scenario.users
    clicks = np.zeros(rounds)
    expected = np.zeros(rounds)
    best = np.zeros(rounds)
    diversity = np.zeros(rounds)
    empty = 0
    shown = np.zeros(len(catalog), dtype=bool)
    genres = world.genres
    everyone = np.arange(users)
    coherence = Coherence(genres, users)
    began = time.perf_counter()
    for r in range(rounds):
        if scenario.shift_at is not None and r == scenario.shift_at:
            world.draw_tastes()
        slates = np.full((users, policies.SLATE), -1, dtype=np.int64)
        for u in range(users):
            slate = np.asarray(policy.slate(u, r), dtype=np.int64)[: policies.SLATE]
            slates[u, : len(slate)] = slate
        sizes = (slates >= 0).sum(axis=1)
        empty += int((sizes == 0).sum())
        expected[r] = world.click_probability(everyone, slates).sum()
        best[r] = world.click_probability(everyone, world.oracle(everyone)).sum()
        diversity[r] = intra_list_diversity(genres, slates).sum()
        shown[slates[slates >= 0]] = True
        coherence.see(slates)
        positions, opened = world.react(everyone, slates)
        clicks[r] = (positions >= 0).sum()
        on_slate = np.flatnonzero(positions >= 0)
        coherence.clicked(on_slate, slates[on_slate, positions[on_slate]])
        browsed = np.flatnonzero(opened >= 0)
        coherence.clicked(browsed, opened[browsed])
        for u in range(users):
            slate = slates[u, : sizes[u]]
            policy.observe(u, r, slate, int(slate[positions[u]]) if positions[u] >= 0 else -1)
            if opened[u] >= 0:
                policy.opened(u, r, int(opened[u]))
        policy.end_round(r)
    return {
        "policy": name,
        "seed": seed,
        "ctr": (clicks / users).tolist(),
        "expected_ctr": (expected / users).tolist(),
        "regret": ((best - expected) / users).tolist(),
        "diversity": (diversity / users).tolist(),
        "coverage": float(shown.mean()),
        "coherence": coherence.result(),
        "empty_slates": empty,
        "seconds": time.perf_counter() - began,
    }


def intra_list_diversity(genres: np.ndarray, slates: np.ndarray) -> np.ndarray:
    """Per slate: 1 - the mean Jaccard similarity of its movies' genre sets over pairs (0: all
    alike); padding (-1) left out; 0 for slates of fewer than 2 movies."""
    members = genres[np.maximum(slates, 0)] * (slates >= 0)[:, :, None]  # users x 10 x genres
    inter = np.einsum("uig,ujg->uij", members, members)
    sizes = members.sum(axis=2)
    union = sizes[:, :, None] + sizes[:, None, :] - inter
    jaccard = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    real = (slates >= 0).astype(float)
    pairs = real[:, :, None] * real[:, None, :] * (1.0 - np.eye(slates.shape[1]))[None]
    count = pairs.sum(axis=(1, 2))
    mean = np.divide((jaccard * pairs).sum(axis=(1, 2)), count, out=np.zeros(len(slates)), where=count > 0)
    diversity: np.ndarray = np.where(count > 0, 1.0 - mean, 0.0)
    return diversity


def run(
    names: tuple[str, ...] = POLICIES,
    seeds: int = 5,
    scenario: Scenario = Scenario(),
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    seed0: int = 0,
    config: PolicyConfig | None = None,
) -> dict[str, Any]:
    tasks = [(name, seed) for seed in range(seed0, seed0 + seeds) for name in names]
    # The slowest first, so the pool ends together.
    tasks.sort(key=lambda t: t[0] not in ("mabrec", "original"))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(run_one, name, seed, scenario, config) for name, seed in tasks]
        for done, future in enumerate(as_completed(futures), start=1):
            result = future.result()
            results[result["policy"]].append(result)
            if progress:
                progress(done, len(futures))
    report = summarize(results, scenario)
    if config is not None:
        report["policy_config"] = asdict(config)
    return report


def _mean_ci(values: np.ndarray) -> tuple[float, float]:
    mean = float(values.mean())
    half = float(1.96 * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return mean, half


def summarize(results: dict[str, list[dict[str, Any]]], scenario: Scenario) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": {**asdict(scenario)}, "policies": {}}
    for name, runs in results.items():
        ctr = np.array([r["ctr"] for r in runs])  # seeds x rounds
        regret = np.array([r["regret"] for r in runs])
        summary = {
            "seeds": len(runs),
            "ctr_by_round": ctr.mean(axis=0).tolist(),
            "ctr_by_round_ci": (1.96 * ctr.std(axis=0, ddof=1) / np.sqrt(len(runs))).tolist()
            if len(runs) > 1
            else [0.0] * scenario.rounds,
            "cumulative_regret_by_round": np.cumsum(regret, axis=1).mean(axis=0).tolist(),
            "clicks_per_user_rounds_1_100": _mean_ci(ctr[:, :100].sum(axis=1)),
            "clicks_per_user_all_rounds": _mean_ci(ctr.sum(axis=1)),
            "ctr": _mean_ci(ctr.mean(axis=1)),
            "cold_start_ctr_rounds_1_5": _mean_ci(ctr[:, :5].mean(axis=1)),
            "cumulative_regret": _mean_ci(regret.sum(axis=1)),
            "coverage": _mean_ci(np.array([r["coverage"] for r in runs])),
            "diversity": _mean_ci(np.array([np.mean(r["diversity"]) for r in runs])),
            "coherence": _coherence(runs),
            "empty_slates": int(sum(r["empty_slates"] for r in runs)),
            "seconds_per_run": round(float(np.mean([r["seconds"] for r in runs])), 1),
        }
        if scenario.shift_at is not None:
            summary["shift"] = shift_recovery(ctr.mean(axis=0), scenario.shift_at)
        out["policies"][name] = summary
    policies_out = out["policies"]
    if "mabrec" in policies_out:
        mine = policies_out["mabrec"]
        out["lifts"] = {
            other: {
                "rounds_1_100": _lift(mine["clicks_per_user_rounds_1_100"][0], s["clicks_per_user_rounds_1_100"][0]),
                "all_rounds": _lift(mine["clicks_per_user_all_rounds"][0], s["clicks_per_user_all_rounds"][0]),
            }
            for other, s in policies_out.items()
            if other != "mabrec"
        }
    return out


def _coherence(runs: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per measure and evidence group, the mean over seeds (None where no user was in it)."""
    out: dict[str, list[float | None]] = {}
    for name in COHERENCE:
        values = np.array([[np.nan if v is None else v for v in r["coherence"][name]] for r in runs])
        means = [float(np.mean(col[~np.isnan(col)])) if (~np.isnan(col)).any() else None for col in values.T]
        out[name] = means
    return out


def _lift(mine: float, theirs: float) -> float | None:
    return round(mine / theirs - 1.0, 4) if theirs > 0 else None


def shift_recovery(ctr: np.ndarray, shift_at: int, window: int = 5) -> dict[str, Any]:
    """Pre-shift CTR (the 20 rounds before), the dip, and the first round after the shift at which
    the trailing `window`-round mean CTR is back to 80% of it (None: never, in the run)."""
    pre = float(ctr[max(0, shift_at - 20) : shift_at].mean())
    after = ctr[shift_at:]
    trailing = np.convolve(after, np.ones(window) / window, mode="valid")
    back = np.flatnonzero(trailing >= 0.8 * pre)
    return {
        "pre_shift_ctr": round(pre, 4),
        "lowest_after": round(float(after.min()), 4),
        "rounds_to_80_percent": int(back[0] + window) if len(back) else None,
    }


def write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
