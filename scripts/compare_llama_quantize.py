"""llmq's GGUF files against llama.cpp's own quantizer (llama-quantize) on the same model and text.

llama.cpp quantizes llmq's F32 GGUF of the model; llmq writes RTN, GPTQ and its `fast` GGUF recipe (GPTQ with
act-order fitted to the unquantized model's outputs) of the same type.  All are read back by transformers'
GGUF loader and scored on the same tokens against the FP32 model: KL divergence, top-1 agreement,
perplexity, file size, and the time each took to make.

Two ways to run llama.cpp:
- the library call behind `llama-quantize` through llama-cpp-python (`pip install -e .[llamacpp]`), no
  importance matrix;
- `--llama-bin DIR`: the `llama-quantize` and `llama-imatrix` programs of a llama.cpp build.  With
  `--imatrix`, llama-imatrix first measures an importance matrix on the calibration windows llmq uses (their
  text, decoded), and llama-quantize uses it.

`--types` takes llama.cpp's mixes (Q4_K_M, Q5_K_M: llmq reproduces their per-tensor choice) and single
types (Q2_K, Q3_K, Q4_0, ...: every tensor of that type but the Q6_K output head, `llama-quantize --pure
--output-tensor-type q6_k`); every file of a type has the same size, which the table shows.

    python scripts/compare_llama_quantize.py --model ../shared/assets/models/llmq-ref-6m --seqlen 256 \\
        --eval ../shared/assets/datasets/wikitext-2-raw-v1/test-00000-of-00001.parquet --max-windows 100 \\
        --calib ../shared/assets/datasets/c4-sample/c4_sample_200docs.jsonl --nsamples 128 \\
        --llama-bin ../llama.cpp/build/bin --imatrix --types Q4_K_M,Q3_K,Q2_K
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from llmq.checkpoint import load_for_eval, load_model
from llmq.data import calibration_tokens, eval_tokens
from llmq.eval import evaluate
from llmq.export import export_gguf
from llmq.pipeline import quantize_model
from llmq.recipe import build_config

# llama.cpp's file types (enum llama_ftype) for the library call
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q4_K_S": 14,
          "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}
GGML_Q6_K = 14  # (enum ggml_type)
MIXES = ("Q4_K_M", "Q5_K_M")  # quantized as llama.cpp mixes them; the rest with --pure
# A single type's llama.cpp file type: with --pure its every tensor gets that file type's base type.
PURE_FTYPE = {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}
RECIPES = {  # llmq's rows: (method, options)
    "llmq GPTQ": {"method": "gptq"},
    "llmq fast (GPTQ act-order, fp_targets 1)": {"method": "gptq", "act_order": True, "fp_targets": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--types", default="Q4_0,Q4_K_M")
    ap.add_argument("--eval", required=True, help="evaluation text (dataset spec)")
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--calib", default="c4", help="calibration text (dataset spec) of llmq and llama-imatrix")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--llama-bin", default=None, help="directory of llama-quantize and llama-imatrix")
    ap.add_argument("--imatrix", action="store_true", help="llama-quantize with an importance matrix (needs --llama-bin)")
    args = ap.parse_args()
    if args.imatrix and not args.llama_bin:
        raise SystemExit("--imatrix needs --llama-bin (the library call takes no importance matrix here)")

    reference, source = load_model(args.model)
    seqlen = args.seqlen or min(2048, getattr(source.config, "max_position_embeddings", 2048))
    tokens = eval_tokens(source.tokenizer(), args.eval)
    if args.max_windows:
        tokens = tokens[: args.max_windows * seqlen]
    calib_ids = calibration_tokens(source.tokenizer(), args.calib, args.nsamples, seqlen)
    fp = evaluate(reference, tokens, seqlen, progress=False)
    print(f"FP32 ppl {fp.ppl:.4f}; {tokens.numel() // seqlen} windows of {seqlen}; calibration {args.nsamples} x {seqlen} "
          f"of {args.calib}\n")
    print("| type | made by | file MiB | KL | top-1 | ppl | seconds |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_gguf(args.model, tmp / "f32.gguf", "F32")
        imatrix = None
        if args.imatrix:
            t0 = time.perf_counter()
            imatrix = _imatrix(Path(args.llama_bin), tmp, source.tokenizer(), calib_ids)
            print(f"(llama-imatrix: {time.perf_counter() - t0:.1f} s, counted in llama.cpp's rows)\n")
        for t in args.types.split(","):
            files, seconds = {}, {}
            who = "llama.cpp (llama-quantize" + (" + imatrix)" if imatrix else ")")
            files[who] = tmp / f"llamacpp-{t}.gguf"
            t0 = time.perf_counter()
            if args.llama_bin:
                _llama_quantize(Path(args.llama_bin), tmp / "f32.gguf", files[who], t, imatrix)
            else:
                _llama_quantize_lib(tmp / "f32.gguf", files[who], t)
            seconds[who] = time.perf_counter() - t0
            files["llmq RTN"] = tmp / f"rtn-{t}.gguf"
            t0 = time.perf_counter()
            export_gguf(args.model, files["llmq RTN"], t)
            seconds["llmq RTN"] = time.perf_counter() - t0
            for name, recipe in RECIPES.items():
                files[name] = tmp / f"{len(files)}-{t}.gguf"
                cfg = build_config({}, {**recipe, "format": "gguf", "gguf_type": t, "seqlen": seqlen, "nsamples": args.nsamples})
                stats = quantize_model(source, cfg, files[name], progress=False, calib_ids=calib_ids)
                seconds[name] = stats.seconds
            for who, f in files.items():
                model, _, _ = load_for_eval(str(f))
                r = evaluate(model, tokens, seqlen, reference=reference, progress=False)
                print(f"| {t} | {who} | {f.stat().st_size / 2**20:.3f} | {r.kld:.5f} | {100 * r.top1:.2f}% | {r.ppl:.4f} "
                      f"| {seconds[who]:.1f} |", flush=True)
                del model


def _imatrix(bin_dir: Path, tmp: Path, tokenizer, calib_ids: torch.Tensor) -> Path:
    """llama-imatrix over the text of llmq's calibration windows, in chunks of their length."""
    text = tmp / "calib.txt"
    text.write_text("\n\n".join(tokenizer.decode(w, skip_special_tokens=True) for w in calib_ids.tolist()))
    out = tmp / "imatrix.gguf"
    _run([str(bin_dir / "llama-imatrix"), "-m", str(tmp / "f32.gguf"), "-f", str(text), "-o", str(out),
          "-c", str(calib_ids.shape[1]), "--chunks", str(calib_ids.shape[0]), "--no-ppl", "-t", str(torch.get_num_threads())])
    return out


def _llama_quantize(bin_dir: Path, f32: Path, out: Path, t: str, imatrix: Path | None) -> None:
    cmd = [str(bin_dir / "llama-quantize")]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    if t not in MIXES:
        cmd += ["--pure", "--output-tensor-type", "q6_k"]
    _run(cmd + [str(f32), str(out), PURE_FTYPE.get(t, t), str(torch.get_num_threads())])


def _llama_quantize_lib(f32: Path, out: Path, t: str) -> None:
    import llama_cpp  # (optional: the llamacpp extra)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[PURE_FTYPE.get(t, t)]
    if t not in MIXES:
        params.pure, params.output_tensor_type = True, GGML_Q6_K
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize to {t}")


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed:\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    main()
