#!/usr/bin/env python3
"""One model's prompt processing (pp128) and decode (tg64) against llama.cpp's `llama-bench` on the
same GGUF file and threads: `bench --json` and `llama-bench -o json`, alternated ROUNDS times,
medians, side by side with the CPU model and flags.

Needs `scripts/llama-cpp/build.sh` and `cargo build --release --example bench`.

Usage: python3 scripts/llama-cpp/bench.py [--model FILE] [--threads 2] [--rounds 3] [--json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def cpu():
    info = open("/proc/cpuinfo").read().splitlines()
    field = lambda name: next((l.split(":", 1)[1].strip() for l in info if l.startswith(name)), "?")
    flags = [f for f in field("flags").split() if f.startswith("avx") or f in ("fma", "f16c")]
    return f"{field('model name')} ({sum(l.startswith('processor') for l in info)} cores; {' '.join(flags)})"


def ours(args):
    cmd = [
        os.path.join(ROOT, "target/release/examples/bench"),
        "--target", args.model, "--only", "target", "--threads", str(args.threads),
        "--prompt-tokens", "128", "--decode-tokens", "64", "--json",
    ]
    out = json.loads(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    return out["target"]["prefill_tok_s"], out["target"]["decode_tok_s"]


def llama(args):
    cmd = [
        os.path.join(ROOT, "target/llama-cpp/bin/llama-bench"),
        "-m", args.model, "-t", str(args.threads), "-p", "128", "-n", "64", "-r", "3", "-o", "json",
    ]
    rows = json.loads(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return pp, tg


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = {"ours": [], "llama.cpp": []}
    for round_ in range(args.rounds):
        runs["ours"].append(ours(args))
        runs["llama.cpp"].append(llama(args))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
    result = {
        "cpu": cpu(),
        "threads": args.threads,
        "rounds": args.rounds,
        "pp128": {"ours": med["ours"][0], "llama.cpp": med["llama.cpp"][0], "ratio": med["ours"][0] / med["llama.cpp"][0]},
        "tg64": {"ours": med["ours"][1], "llama.cpp": med["llama.cpp"][1], "ratio": med["ours"][1] / med["llama.cpp"][1]},
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"CPU: {result['cpu']}; {args.threads} threads; medians of {args.rounds} alternated rounds")
    for test in ("pp128", "tg64"):
        r = result[test]
        print(f"{test}: ours {r['ours']:.2f} tok/s, llama-bench {r['llama.cpp']:.2f} tok/s, {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
