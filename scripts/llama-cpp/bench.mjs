// llama.cpp's speed on the same GGUF files as `cargo run --release --example bench`, printed as
// the same JSON shape: prompt processing and decoding in tokens per second, and one forward of
// k tokens after a context, medians of several runs. llama.cpp runs through node-llama-cpp's
// prebuilt CPU libraries (no compiler needed).
//
//   cd scripts/llama-cpp && npm i -E && cd ../..
//   node scripts/llama-cpp/bench.mjs [--target F] [--draft F] [--only target|draft|both]
//       [--threads N] [--prompt-tokens 128] [--decode-tokens 64] [--context 128]
//       [--ks 1,2,4,8,16] [--repeats 7]
//
// Differences from ours, stated in the output: llama.cpp computes the logits of the last
// position only for the k-token forwards (ours: every position, as verification needs), and
// its decode loop goes through node-llama-cpp's JavaScript evaluation loop (small per token).
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import os from "node:os";
import path from "node:path";
import {parseOptions, root} from "./options.mjs";

const options = parseOptions({
    target: "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    draft: "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    only: "both",
    threads: os.availableParallelism(),
    "prompt-tokens": 128,
    "decode-tokens": 64,
    context: 128,
    ks: "1,2,4,8,16",
    repeats: 7,
});
const ks = String(options.ks).split(",").map(Number);

const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
// The same ids as examples/bench.rs.
const tokens = (n, seed) => Array.from({length: n}, (_, i) =>
    100 + (((Math.imul(i, 2654435761) + seed) >>> 0) >>> 8) % 20000);
const now = () => Number(process.hrtime.bigint()) / 1e6;

async function benchModel(llama, file) {
    const model = await llama.loadModel({modelPath: path.resolve(root, file), gpuLayers: 0});
    const contextSize = Math.max(options["prompt-tokens"], options.context + Math.max(...ks),
        options["decode-tokens"] + 2) + 16;
    const context = await model.createContext({
        contextSize, batchSize: contextSize, threads: options.threads, sequences: 1,
    });
    const sequence = context.getSequence();

    const prefill = [];
    for (let run = 0; run < 3; run++) {
        await sequence.clearHistory();
        const started = now();
        await sequence.evaluateWithoutGeneratingNewTokens(tokens(options["prompt-tokens"], 1));
        if (run > 0) prefill.push(now() - started);
    }

    const decode = [];
    for (let run = 0; run < 3; run++) {
        await sequence.clearHistory();
        let generated = 0;
        let started = 0;
        for await (const _ of sequence.evaluate([100], {temperature: 0})) {
            // The first token comes from the one-token prompt; time the rest.
            if (generated === 0) started = now();
            generated += 1;
            if (generated > options["decode-tokens"]) break;
        }
        decode.push(now() - started);
    }

    await sequence.clearHistory();
    await sequence.evaluateWithoutGeneratingNewTokens(tokens(options.context, 2));
    const forward = {};
    for (const k of ks) {
        const window = tokens(k, 3 + k);
        const times = [];
        for (let run = 0; run < options.repeats + 2; run++) {
            const started = now();
            await sequence.evaluateWithoutGeneratingNewTokens(window);
            const elapsed = now() - started;
            await sequence.eraseContextTokenRanges([{start: options.context, end: options.context + k}]);
            if (run >= 2) times.push(elapsed);
        }
        forward[String(k)] = median(times);
    }
    const result = {
        model: file,
        prefill_tok_s: options["prompt-tokens"] / (median(prefill) / 1e3),
        decode_tok_s: options["decode-tokens"] / (median(decode) / 1e3),
        forward_ms: forward,
        forward_logits: "last position only",
        prompt_tokens: options["prompt-tokens"],
        decode_tokens: options["decode-tokens"],
        context: options.context,
        threads: options.threads,
    };
    await context.dispose();
    await model.dispose();
    return result;
}

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const out = {engine: "llama.cpp via node-llama-cpp 3.21.1", build: llama.buildType ?? null};
if (options.only !== "draft") out.target = await benchModel(llama, options.target);
if (options.only !== "target") out.draft = await benchModel(llama, options.draft);
console.log(JSON.stringify(out, null, 2));
await llama.dispose();
