#!/usr/bin/env python3
"""How well each generation monitor predicts a wrong answer: AUC with a bootstrap interval.

Generates multi-step arithmetic word problems with known integer answers from fixed templates
and a seed (2 to 4 operations each: shopping, travel, time, savings, sharing), asks the target
greedily to think step by step briefly and end with "Answer: <number>", grades each output by
the last number in it, and computes, for every numeric statistic of every monitor's summary,
the AUC for predicting a wrong answer (the statistic as the score, wrong = positive; ties count
half; a statistic that is null for a problem leaves that problem out of its row) with a 95%
percentile interval from 1,000 bootstrap resamples of the problems. An AUC below 0.5 means the
statistic is lower on wrong answers; it is reported as it is. Plain Python, no dependencies.

The generations run through `examples/monitor_study.rs` (the batched engine, every monitor,
default parameters unless --monitor-config), built and run with cargo.

Usage:
    python3 scripts/monitor_auc.py                           # 300 problems on the default 1.5B
    python3 scripts/monitor_auc.py --n 10 --target models/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 scripts/monitor_auc.py --generations out/generations.jsonl   # regrade, no model

Writes --out (default target/monitor_auc/): problems.jsonl, prompts.jsonl, generations.jsonl,
results.json and table.md (the table is also printed).
"""

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TARGET = "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
INSTRUCTION = (
    "Solve this problem. Think step by step briefly, then end with 'Answer: <number>'.\n\n"
)
NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Diego", "Sara", "Ivan"]


def shopping(rng):
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(1, 6)
    total = a * p + b * q
    bill = (total // 10 + rng.randint(1, 5)) * 10
    name = rng.choice(NAMES)
    text = (
        f"{name} buys {a} notebooks at ${p} each and {b} pens at ${q} each. "
        f"{name} pays with ${bill}. How many dollars of change does {name} get?"
    )
    return text, bill - total, 4


def discount(rng):
    price = rng.choice([20, 40, 60, 80, 100, 120])
    off = rng.choice([10, 25, 50])
    n, cap = rng.randint(2, 5), rng.randint(3, 19)
    name = rng.choice(NAMES)
    text = (
        f"A shirt costs ${price} and is on sale for {off}% off. {name} buys {n} shirts "
        f"and a cap for ${cap}. How many dollars does {name} spend in total?"
    )
    return text, n * (price - price * off // 100) + cap, 4


def travel(rng):
    s1, h1, s2, h2 = rng.randint(40, 90), rng.randint(2, 5), rng.randint(30, 80), rng.randint(1, 4)
    text = (
        f"A train travels at {s1} km per hour for {h1} hours, then at {s2} km per hour for "
        f"{h2} hours. How many kilometers does it travel in total?"
    )
    return text, s1 * h1 + s2 * h2, 3


def fuel(rng):
    per100, km = rng.randint(5, 12), rng.choice([100, 200, 300, 400, 500])
    text = (
        f"A car uses {per100} liters of fuel per 100 km. It drives {km} km to a city and "
        f"the same way back. How many liters of fuel does it use?"
    )
    return text, per100 * km // 100 * 2, 3


def schedule(rng):
    m1, brk, m2 = rng.randint(80, 150), rng.randint(10, 30), rng.randint(70, 140)
    text = (
        f"A movie lasts {m1} minutes. After it there is a {brk}-minute break, then a second "
        f"movie of {m2} minutes. How many minutes pass from the start of the first movie to "
        f"the end of the second?"
    )
    return text, m1 + brk + m2, 2


def savings(rng):
    start, weekly, weeks = rng.randint(20, 90), rng.randint(5, 25), rng.randint(3, 10)
    bike = rng.randint(30, min(120, start + weekly * weeks))
    name = rng.choice(NAMES)
    text = (
        f"{name} has ${start}. {name} earns ${weekly} every week for {weeks} weeks, then "
        f"spends ${bike} on a bike. How many dollars does {name} have left?"
    )
    return text, start + weekly * weeks - bike, 3


def sharing(rng):
    friends = rng.randint(2, 6)
    each = rng.randint(3, 12)
    rotten = rng.randint(1, 9)
    per_box = rng.randint(6, 15)
    # Enough whole boxes for every friend's share plus the rotten ones, the rest left over.
    boxes = -(-(friends * each + rotten) // per_box)
    good = boxes * per_box - rotten
    text = (
        f"There are {boxes} boxes with {per_box} apples in each. {rotten} apples are rotten "
        f"and thrown away. The rest are shared equally among {friends} friends, and any "
        f"apples left over are kept. How many apples does each friend get?"
    )
    return text, good // friends, 4


TEMPLATES = [shopping, discount, travel, fuel, schedule, savings, sharing]


def problems(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        text, answer, ops = template(rng)
        out.append({"id": i, "template": template.__name__, "operations": ops,
                    "question": text, "answer": answer})
    return out


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text):
    found = NUMBER.findall(text or "")
    if not found:
        return None
    try:
        value = float(found[-1].replace(",", ""))
    except ValueError:
        return None
    return value


def auc(scores, labels):
    """P(score of a positive > score of a negative), ties half (Mann-Whitney)."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return None
    # Rank-sum with average ranks for ties.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, l in zip(ranks, labels) if l)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def bootstrap(scores, labels, resamples, rng):
    values = []
    n = len(scores)
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        a = auc([scores[i] for i in idx], [labels[i] for i in idx])
        if a is not None:
            values.append(a)
    if not values:
        return None, None
    values.sort()
    lo = values[int(math.floor(0.025 * (len(values) - 1)))]
    hi = values[int(math.ceil(0.975 * (len(values) - 1)))]
    return lo, hi


def statistics(generation):
    """(name, value) for every numeric statistic of every monitor summary (timing as a number)."""
    out = {}
    report = generation.get("monitors") or {}
    for summary in report.get("summaries", []):
        monitor = summary.get("monitor")
        for key, value in summary.items():
            if key in ("monitor", "tokens"):
                continue
            if key == "peak_timing":
                value = {"early": 0, "middle": 1, "late": 2}.get(value)
            if isinstance(value, bool) or value is None:
                value = None if value is None else float(value)
            out[f"{monitor}.{key}"] = value
        if monitor == "path_deviation":
            out["path_deviation.would_stop"] = 0.0 if summary.get("stop_index") is None else 1.0
    out["output.tokens"] = float(generation.get("tokens", 0))
    return out


def run_generations(args, prompts_path, generations_path):
    if args.no_build:
        binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                              "release", "examples", "monitor_study")
        command = [binary]
    else:
        command = ["cargo", "run", "--release", "--example", "monitor_study", "--"]
    command += [
        "--target", args.target, "--prompts", prompts_path,
        "--max-new-tokens", str(args.max_new_tokens), "--max-batch", str(args.max_batch),
    ]
    if args.monitor_config:
        command += ["--monitor-config", args.monitor_config]
    print("+", " ".join(command), file=sys.stderr)
    with open(generations_path, "w") as out:
        subprocess.run(command, cwd=ROOT, stdout=out, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    # 120 tokens cut off 97% of the 1.5B's answers before "Answer:" (it explains at length).
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--no-build", action="store_true",
                        help="run the built target/release/examples/monitor_study, no cargo")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--monitor-config", help="a MonitorConfig in JSON")
    parser.add_argument("--out", default=os.path.join(ROOT, "target", "monitor_auc"))
    parser.add_argument("--generations", help="grade this generations.jsonl instead of running")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    items = problems(args.n, args.seed)
    with open(os.path.join(args.out, "problems.jsonl"), "w") as f:
        for p in items:
            f.write(json.dumps(p) + "\n")
    prompts_path = os.path.join(args.out, "prompts.jsonl")
    with open(prompts_path, "w") as f:
        for p in items:
            f.write(json.dumps({"id": p["id"], "prompt": INSTRUCTION + p["question"]}) + "\n")
    generations_path = args.generations or os.path.join(args.out, "generations.jsonl")
    if not args.generations:
        run_generations(args, prompts_path, generations_path)
    by_id = {}
    with open(generations_path) as f:
        for line in f:
            if line.strip():
                g = json.loads(line)
                by_id[g["id"]] = g

    rows = []
    for p in items:
        g = by_id.get(p["id"])
        if g is None:
            continue
        got = last_number(g.get("text"))
        wrong = got is None or abs(got - p["answer"]) > 1e-9
        rows.append((wrong, statistics(g)))
    if not rows:
        sys.exit("no generations to grade")
    wrong_count = sum(1 for w, _ in rows if w)
    names = sorted({k for _, s in rows for k in s})
    rng = random.Random(args.seed)
    results = []
    for name in names:
        pairs = [(s[name], w) for w, s in rows if s.get(name) is not None]
        scores = [v for v, _ in pairs]
        labels = [w for _, w in pairs]
        value = auc(scores, labels)
        lo, hi = bootstrap(scores, labels, args.resamples, rng) if value is not None else (None, None)
        results.append({"statistic": name, "n": len(pairs), "auc": value, "ci_low": lo, "ci_high": hi})

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"{len(rows)} problems (seed {args.seed}), {wrong_count} wrong "
        f"({100 * wrong_count / len(rows):.1f}%), target `{args.target}`, greedy, "
        f"{args.max_new_tokens} new tokens at most; AUC for predicting a wrong answer, 95% "
        f"bootstrap interval ({args.resamples} resamples).",
        "",
        "| statistic | n | AUC | 95% interval |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r['statistic']}` | {r['n']} | {fmt(r['auc'])} | "
                     f"{fmt(r['ci_low'])} to {fmt(r['ci_high'])} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"problems": len(rows), "wrong": wrong_count, "seed": args.seed,
                   "target": args.target, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
