#!/usr/bin/env python3
"""Our batched engine against llama.cpp's `llama-batched-bench` on the same GGUF file and threads,
alternated ROUNDS times, medians per batch size, side by side with the CPU.

Needs `scripts/llama-cpp/build.sh` (llama-batched-bench) and
`cargo build --release --example batched_bench`.

Usage: python3 scripts/llama-cpp/batched.py [--model FILE] [--threads 2] [--rounds 2]
           [--batches 1,2,4,8,16] [--prompt-tokens 128] [--new-tokens 32] [--json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def ours(args):
    cmd = [
        os.path.join(ROOT, "target/release/examples/batched_bench"),
        "--target", args.model,
        "--threads", str(args.threads),
        "--batches", args.batches,
        "--prompt-tokens", str(args.prompt_tokens),
        "--new-tokens", str(args.new_tokens),
        "--repeats", "1",
        "--json",
    ]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    return report["cpu"], {r["batch"]: (r["prefill_tok_s"], r["decode_tok_s"]) for r in report["batched"]}


def llama(args):
    cmd = [
        os.path.join(ROOT, "target/llama-cpp/bin/llama-batched-bench"),
        "-m", args.model,
        "-t", str(args.threads),
        "-c", str(max(4096, 2 * max(map(int, args.batches.split(","))) * (args.prompt_tokens + args.new_tokens))),
        "-b", "2048",
        "-ub", "512",
        "-npp", str(args.prompt_tokens),
        "-ntg", str(args.new_tokens),
        "-npl", args.batches,
        "--output-format", "jsonl",
    ]
    run = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    rows = {}
    for line in (run.stdout + run.stderr).splitlines():
        line = line.strip()
        if line.startswith('{"n_kv_max"'):
            r = json.loads(line)
            rows[r["pl"]] = (r["speed_pp"], r["speed_tg"])
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = {"ours": [], "llama.cpp": []}
    cpu = "?"
    for round_ in range(args.rounds):
        cpu, mine = ours(args)
        runs["ours"].append(mine)
        runs["llama.cpp"].append(llama(args))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    batches = [int(b) for b in args.batches.split(",")]
    table = []
    for b in batches:
        row = {"batch": b}
        for name, results in runs.items():
            row[name] = {
                "prefill_tok_s": statistics.median(r[b][0] for r in results if b in r),
                "decode_tok_s": statistics.median(r[b][1] for r in results if b in r),
            }
        row["decode_ratio"] = row["ours"]["decode_tok_s"] / row["llama.cpp"]["decode_tok_s"]
        row["prefill_ratio"] = row["ours"]["prefill_tok_s"] / row["llama.cpp"]["prefill_tok_s"]
        table.append(row)
    if args.json:
        print(json.dumps({"cpu": cpu, "threads": args.threads, "rounds": args.rounds, "rows": table}, indent=2))
        return
    print(f"CPU: {cpu}; {args.threads} threads; medians of {args.rounds} alternated rounds")
    print("| B | ours prefill | llama.cpp prefill | ratio | ours decode | llama.cpp decode | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        o, l = row["ours"], row["llama.cpp"]
        print(
            f"| {row['batch']} | {o['prefill_tok_s']:.1f} | {l['prefill_tok_s']:.1f} | {row['prefill_ratio']:.2f}x "
            f"| {o['decode_tok_s']:.2f} | {l['decode_tok_s']:.2f} | {row['decode_ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
