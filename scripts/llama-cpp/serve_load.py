#!/usr/bin/env python3
"""`load` against our server and against llama.cpp's `llama-server` on the same GGUF, same threads.

Starts each server in turn on loopback, runs `examples/load/` at the same client levels with
fixed-length greedy outputs (`ignore_eos`), stops it, and prints one table: throughput, p50/p99
latency and time to first token per level and server. Our server runs with `--max-batch 1` (one
request at a time, the old server) and `--max-batch N`; llama-server with `-np N` slots.

Usage (after `cargo build --release --example serve --example load` and
`scripts/llama-cpp/build.sh`):
    python3 scripts/llama-cpp/serve_load.py [--clients 1,4,8,16] [--max-tokens 32]
        [--slots 8] [--methods ar,sd] [--threads 2] [--target FILE] [--draft FILE]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "examples")
LLAMA = os.path.join(ROOT, "target", "llama-cpp", "bin", "llama-server")


def wait_healthy(port, process, seconds=600):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server on port {port} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(1)
    sys.exit(f"the server on port {port} did not become healthy")


def stop(process):
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure(command, port, args, server_kind, method):
    """Starts `command` (a server on `port`), runs the load on it, stops it."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port, process)
        return run_load(port, args, server_kind, method)
    finally:
        stop(process)


def run_load(port, args, server_kind, method):
    command = [
        os.path.join(BIN, "load"),
        "--url", f"http://127.0.0.1:{port}",
        "--server", server_kind,
        "--clients", args.clients,
        "--requests-per-client", str(args.requests_per_client),
        "--max-tokens", str(args.max_tokens),
        "--prompts", args.prompts,
        "--prompt-count", "16",
        "--no-reference",
        "--json",
    ]
    if method:
        command += ["--method", method]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"load failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["levels"]


def cpu():
    info = open("/proc/cpuinfo").read().splitlines()
    name = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in info if l.startswith("flags")), [])
    vector = [f for f in flags if f.startswith("avx") or f in ("fma", "f16c")]
    return f"{name} ({sum(l.startswith('processor') for l in info)} cores; {' '.join(vector)})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--methods", default="ar,sd")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--target", default="models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    parser.add_argument("--draft", default="models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    parser.add_argument("--prompts", default="../shared/prompts/bench.jsonl")
    parser.add_argument("--context", type=int, default=2048, help="llama-server context per slot")
    args = parser.parse_args()
    methods = args.methods.split(",")
    rows = []
    configs = [("mirror-sd --max-batch 1", 1, m) for m in methods[:1]]
    configs += [(f"mirror-sd --max-batch {args.slots}", args.slots, m) for m in methods]
    for name, max_batch, method in configs:
        port = 18080
        command = [
            os.path.join(BIN, "serve"),
            "--target", args.target, "--draft", args.draft,
            "--method", "ar", "--methods", "ar,sd,lookup",
            "--max-batch", str(max_batch),
            "--port", str(port),
            "--target-threads", str(args.threads),
            "--draft-threads", str(args.threads),
        ]
        for level in measure(command, port, args, "mirror-sd", method):
            rows.append((f"{name} ({method})", level))
    port = 18081
    command = [
        LLAMA, "-m", os.path.join(ROOT, args.target),
        "-np", str(args.slots), "-c", str(args.context * args.slots),
        "-t", str(args.threads), "-tb", str(args.threads),
        "--port", str(port), "--host", "127.0.0.1",
    ]
    for level in measure(command, port, args, "llama-server", None):
        rows.append((f"llama-server -np {args.slots}", level))
    print(f"CPU: {cpu()}; {args.max_tokens} tokens per request, greedy, ignore_eos, streamed")
    print("| server | clients | ok | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, level in rows:
        f = lambda key: "-" if level.get(key) is None else f"{level[key]:.2f}"
        print(
            f"| {name} | {level['clients']} | {level['ok']}/{level['requests']} | "
            f"{level['tokens_per_second']:.2f} | {f('latency_p50_s')} | {f('latency_p99_s')} | "
            f"{f('ttft_p50_s')} | {f('ttft_p99_s')} |"
        )
    json.dump({"cpu": cpu(), "rows": [{"server": n, **l} for n, l in rows]},
              open(os.path.join(ROOT, "target", "serve_load.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
