#!/usr/bin/env python3
"""Round by round: each target's CPU per request and p99 against nginx's in the same round.

Usage: e2e/bench/rounds.py RAW_TSV   (the harness's raw.tsv; e2e/bench/compare.sh runs it)

The harness's table gives medians over rounds, and its rounds' req/s spread by 15-30 % on a
shared 2-core machine, so two medians alone cannot say whether one proxy is reliably cheaper.
The targets of a round run back to back, under much the same conditions: their ratio in that
round is a paired measurement. For each ratio this prints the rounds' values, their median, and
in how many rounds it was under 1.0, with the one-sided sign test's p-value: the chance of at
least that many rounds under 1.0 were each round a coin toss (no difference).
"""
import csv
import math
import statistics
import sys
from collections import defaultdict


def sign_test(under: int, n: int) -> float:
    """P(at least `under` of `n` fair coin tosses come up heads)."""
    return sum(math.comb(n, k) for k in range(under, n + 1)) / 2**n


def main(path: str) -> None:
    rounds = defaultdict(dict)  # (case, round) -> target -> (cpu µs/req, p99 ms)
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            rps = float(row["rps"])
            if rps <= 0:
                continue
            cpu_us = float(row["cpu_pct"]) * 1e4 / rps
            rounds[(row["case"], row["round"])][row["target"]] = (cpu_us, float(row["p99_ms"]))
    cases = sorted({case for case, _ in rounds})
    for case in cases:
        # In round order (the rounds are numbers, kept as text).
        keyed = [
            t
            for (c, _), t in sorted(rounds.items(), key=lambda kv: int(kv[0][1]))
            if c == case and "nginx" in t
        ]
        targets = sorted({n for t in keyed for n in t} - {"nginx", "direct"})
        for target in targets:
            pairs = [(t[target], t["nginx"]) for t in keyed if target in t]
            if not pairs:
                continue
            print(f"{case}, {target} vs nginx, {len(pairs)} rounds:")
            for label, i in (("CPU µs/req", 0), ("p99", 1)):
                ratios = [a[i] / b[i] for a, b in pairs if b[i] > 0]
                if not ratios:
                    continue
                under = sum(r < 1.0 for r in ratios)
                print(
                    f"  {label:10} ratio median {statistics.median(ratios):.2f}"
                    f" (rounds {min(ratios):.2f}-{max(ratios):.2f}: "
                    + " ".join(f"{r:.2f}" for r in ratios)
                    + f"); under 1.0 in {under} of {len(ratios)},"
                    f" sign test p = {sign_test(under, len(ratios)):.3f}"
                )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
