"""sha256 of the files llmq writes for a fixed set of recipes, to check that a refactor changes no byte.

    python scripts/output_hashes.py --model ../shared/assets/models/llmq-ref-6m \
        --dataset ../shared/assets/datasets/c4-sample/c4_sample_200docs.jsonl > hashes.md

Files that record time (llmq_provenance.json, the per-module log's seconds) are left out.  A GGUF
file gets two hashes: the whole file, and its content without `general.name` (a name may change
while every tensor and every other key stays the same).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPES = {
    "gptq-w4g128": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    "awq-w4g128-awq-format": ["--method", "awq", "--bits", "4", "--group-size", "128", "--format", "awq"],
    "gptq-w4g128-asym-ct": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--asym", "--format", "compressed-tensors"],
    "gguf-q4_0-gptq": ["--method", "gptq", "--format", "gguf", "--gguf-type", "Q4_0"],
    "gguf-q4_k_m-gptq": ["--method", "gptq", "--format", "gguf", "--gguf-type", "Q4_K_M"],
    "gguf-q6_k-rtn": ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q6_K"],
}
SKIP = ("llmq_provenance.json", "llmq_quantize_log.jsonl")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gguf_content_hash(path: Path) -> str:
    """Every key but general.name, and every tensor's name, type, shape and bytes."""
    import gguf

    r = gguf.GGUFReader(str(path))
    h = hashlib.sha256()
    for name, field in sorted(r.fields.items()):
        if name != "general.name":
            h.update(name.encode())
            for part in field.parts:
                h.update(bytes(part.tobytes()))
    for t in r.tensors:
        h.update(f"{t.name}:{t.tensor_type.name}:{list(t.shape)}".encode())
        h.update(t.data.tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--nsamples", default="16")
    ap.add_argument("--seqlen", default="128")
    args = ap.parse_args()
    print("| recipe | file | sha256 |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in RECIPES.items():
            gguf_out = "--format" in flags and flags[flags.index("--format") + 1] == "gguf"
            out = Path(tmp) / (f"{name}.gguf" if gguf_out else name)
            cmd = [sys.executable, "-m", "llmq", "quantize", "--model", args.model, "--out", str(out), "--quiet",
                   "--dataset", args.dataset, "--nsamples", args.nsamples, "--seqlen", args.seqlen, *flags]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            if gguf_out:
                print(f"| {name} | {out.name} | {sha256(out)} |")
                print(f"| {name} | {out.name} without general.name | {gguf_content_hash(out)} |")
                continue
            for f in sorted(out.iterdir()):
                if f.name not in SKIP:
                    print(f"| {name} | {f.name} | {sha256(f)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
