// Command-line options shared by the llama.cpp scripts: `--key value` pairs over a table of
// defaults, numbers parsed where the default is a number; anything else exits with status 2.
import path from "node:path";
import {fileURLToPath} from "node:url";

/** The repository root, which model paths are relative to. */
export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** `defaults` overridden by `--key value` pairs from `argv`. */
export function parseOptions(defaults, argv = process.argv.slice(2)) {
    const options = {...defaults};
    for (let i = 0; i < argv.length; i += 2) {
        const key = argv[i].replace(/^--/, "");
        if (!(key in options) || argv[i + 1] === undefined) {
            console.error(`unknown or incomplete option ${argv[i]}`);
            process.exit(2);
        }
        options[key] = typeof options[key] === "number" ? Number(argv[i + 1]) : argv[i + 1];
    }
    return options;
}
