"""Headline figures of the new-forest adaptation: AbsRel shipped vs FedAvg/SCAFFOLD vs pooled, bytes and s per round.

    .venv/bin/python bench/bench_adaptation.py     # one quick run (records the swarm once; ~10 min on 2 cores)
    .venv/bin/python bench/bench_adaptation.py --json experiments/results/adaptation.json   # figures of a saved run

The run is ``experiments/adaptation.py``'s quick configuration (one seed) with its recording cached in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def figures(result: dict) -> list[str]:
    """The headline lines of an adaptation result (as ``run`` returns it or its JSON holds it)."""
    s = result["summary"]
    m = s["methods"]
    shipped, fed, pooled = (m[k]["absrel"]["mean"] for k in ("shipped", "fedavg", "pooled"))
    costs = s.get("fedavg_costs", {})
    config = result["config"]
    rounds = config["rounds"] if isinstance(config, dict) else config.rounds
    seeds = config["seeds"] if isinstance(config, dict) else config.seeds
    return [
        f"adaptation ({len(seeds)} seed(s), {rounds} rounds): AbsRel shipped {shipped:.3f}, FedAvg {fed:.3f}, "
        f"pooled {pooled:.3f}; alone own {m['alone']['own/absrel']['mean']:.3f} / others "
        f"{m['alone']['others/absrel']['mean']:.3f}",
        f"FedAvg / shipped = {fed / shipped:.2f} ({100 * (1 - fed / shipped):.0f} % better); "
        f"FedAvg / pooled = {fed / pooled:.2f}",
        f"per round: {costs.get('bytes_down', {}).get('mean', float('nan')) / 1e6:.2f} MB down, "
        f"{costs.get('bytes_up', {}).get('mean', float('nan')) / 1e6:.2f} MB up, "
        f"{costs.get('wall_s', {}).get('mean', float('nan')):.1f} s wall",
    ] + scaffold_figures(s)


def scaffold_figures(summary: dict) -> list[str]:
    """SCAFFOLD's lines, when the run has it: against shipped, pooled and pooled trained as long; its costs."""
    m = summary["methods"]
    if "scaffold_costs" not in summary:
        return []
    shipped, pooled = m["shipped"]["absrel"]["mean"], m["pooled"]["absrel"]["mean"]
    scaffold, long = m["scaffold"]["absrel"]["mean"], m["pooled_long"]["absrel"]["mean"]
    costs = summary["scaffold_costs"]
    return [
        f"SCAFFOLD {scaffold:.3f}: / shipped = {scaffold / shipped:.2f}; / pooled = {scaffold / pooled:.2f}; "
        f"/ pooled trained as long ({long:.3f}) = {scaffold / long:.2f}",
        f"SCAFFOLD per round: {costs.get('bytes_down', {}).get('mean', float('nan')) / 1e6:.2f} MB down, "
        f"{costs.get('bytes_up', {}).get('mean', float('nan')) / 1e6:.2f} MB up, "
        f"{costs.get('wall_s', {}).get('mean', float('nan')):.1f} s wall",
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="print the figures of a saved adaptation.json instead of running")
    parser.add_argument("--out", type=Path, default=None, help="where the quick run writes (default: a temp dir)")
    parser.add_argument("--model", default="autoencoder_160x128", help="shipped network to adapt")
    args = parser.parse_args(argv)
    if args.json:
        result = json.loads(args.json.read_text())
    else:
        import dataclasses

        from experiments import adaptation

        config = dataclasses.replace(adaptation.AdaptationConfig.quick(), model=args.model)
        out = args.out or Path(tempfile.mkdtemp(prefix="bench-adapt-"))
        result = adaptation.run(config, out)
    for line in figures(result):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
