// llama.cpp's plain decoding as a method of `cargo run --release --example compare -- --llama-cpp`:
// a long-lived process that loads the GGUF once, then answers one request per line on stdin,
// `{"tokens": [...], "max_new_tokens": N, "stop": [...]}`, with one line on stdout,
// `{"tokens": [...], "seconds": S, "prefill_seconds": P}`: greedy decoding of the given prompt
// ids (the ones our methods get), timed from the prompt to the last token as ours are, and
// ending at a stop id (included) or after N tokens. llama.cpp runs through node-llama-cpp's
// prebuilt CPU libraries (no compiler needed).
//
//   cd scripts/llama-cpp && npm i -E && cd ../..
//   node scripts/llama-cpp/suite.mjs --model models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf [--threads N]
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import {parseOptions, root} from "./options.mjs";

const options = parseOptions({model: "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", threads: os.availableParallelism(), context: 4096});
const now = () => Number(process.hrtime.bigint()) / 1e9;

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: path.resolve(root, options.model), gpuLayers: 0});
const context = await model.createContext({
    contextSize: options.context, batchSize: 512, threads: options.threads, sequences: 1,
});
const sequence = context.getSequence();
// Ready: the caller waits for this line before it sends requests.
console.log(JSON.stringify({ready: true, engine: "llama.cpp via node-llama-cpp 3.21.1", threads: options.threads}));

const lines = readline.createInterface({input: process.stdin});
for await (const line of lines) {
    if (!line.trim()) continue;
    let reply;
    try {
        const request = JSON.parse(line);
        const stop = new Set(request.stop ?? []);
        await sequence.clearHistory();
        const out = [];
        const started = now();
        let prefill = null;
        for await (const token of sequence.evaluate(request.tokens, {temperature: 0})) {
            if (prefill === null) prefill = now() - started;
            out.push(token);
            if (stop.has(token) || out.length >= request.max_new_tokens) break;
        }
        reply = {tokens: out, seconds: now() - started, prefill_seconds: prefill ?? 0};
    } catch (error) {
        reply = {error: String(error)};
    }
    console.log(JSON.stringify(reply));
}
await context.dispose();
await model.dispose();
await llama.dispose();
