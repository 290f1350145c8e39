"""`mabrec simulate`: run the comparison, write the report and plots, print the table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from sim import POLICIES, report, runner
from system.core.policy_config import PolicyConfig


def policy_config(assignments: list[str]) -> PolicyConfig | None:
    """PolicyConfig with `knob=value` assignments (--set), each value of its field's type."""
    if not assignments:
        return None
    fields = {f.name: f for f in dataclasses.fields(PolicyConfig)}
    changes: dict[str, Any] = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        default = getattr(PolicyConfig(), name, None) if name in fields else None
        if not isinstance(default, bool | int | float) or not value:
            raise ValueError(f"--set {assignment!r}: expected KNOB=VALUE with a numeric knob of {sorted(fields)}")
        changes[name] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    return PolicyConfig(**changes)


def simulate(args: argparse.Namespace) -> int:
    if args.url:
        import uvloop

        from sim.http import run_http

        live = uvloop.run(run_http(args.url, users=args.users, rounds=args.rounds, seed=args.seed))
        print(
            f"{live['users']} users x {live['rounds']} rounds against {args.url}: CTR by round {live['ctr_by_round']}"
        )
        print(
            f"mean CTR {live['ctr']:.3f}; cold start (rounds 1-5) {live['cold_start_ctr']:.3f}; {live['empty_slates']} empty slates"
        )
        return 0
    from tqdm import tqdm

    names = tuple(args.policies.split(","))
    unknown = set(names) - set(POLICIES)
    if unknown:
        print(f"mabrec simulate: unknown policies {sorted(unknown)}; known: {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    try:
        config = policy_config(args.set)
    except ValueError as exc:
        print(f"mabrec simulate: {exc}", file=sys.stderr)
        return 2
    scenario = runner.Scenario(users=args.users, rounds=args.rounds, shift_at=args.shift_at)
    began = time.monotonic()
    bar = tqdm(total=len(names) * args.seeds, desc="simulating", unit="run", disable=not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    result = runner.run(names, args.seeds, scenario, progress=progress, seed0=args.seed, config=config)
    bar.close()
    result["seconds"] = round(time.monotonic() - began, 1)
    stem = "shift" if args.shift_at is not None else "comparison"
    out: Path = args.output
    runner.write(result, out / f"{stem}.json")
    images = report.plots(result, out, stem)
    text = report.table(result)
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(
        f"\n{result['seconds']:.0f} s; wrote {out / (stem + '.json')}, {out / (stem + '.md')}, "
        + ", ".join(str(p) for p in images)
    )
    return 0
