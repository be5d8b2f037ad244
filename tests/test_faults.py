"""Nothing lost, nothing half-written, no traceback: bad input and faults as a hostile user meets them.

Every case runs the command line in this process (``llmq.cli.main``): an unexpected exception fails the test
with its traceback; a user's mistake must come back as one ``llmq: error:`` line and exit 2, with no output
written and the source untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import C4, ROOT, STORIES, TINYSTORIES, need
from llmq.cli import main

RTN = ["quantize", "--quiet", "--method", "rtn", "--bits", "4", "--group-size", "32"]


def _tree_hash(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tmp_path) -> Path:
    """A copy of stories260K the test may damage."""
    d = tmp_path / "model"
    shutil.copytree(need(STORIES), d)
    return d


def _user_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("gguf", "transformers"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("llmq: error:"), (code, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _outputs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "model")


# ---- non-finite weights ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("poison", ["nan-tensor", "one-inf"])
def test_nonfinite_weights_are_refused_by_name(model, tmp_path, capsys, method, poison):
    w = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    if poison == "nan-tensor":
        w[name] = torch.full_like(w[name], float("nan"))
    else:
        w[name][3, 5] = float("inf")
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})
    src = _tree_hash(model)
    args = ["quantize", "--quiet", "--method", method, "--bits", "4", "--group-size", "4", "--model", str(model),
            "--dataset", str(need(TINYSTORIES)), "--nsamples", "4", "--seqlen", "64"]
    line = _user_error(capsys, main([*args, "--out", str(tmp_path / "q")]), name, "non-finite", "--allow-nonfinite")
    assert ("262144" if poison == "nan-tensor" else " 1 ") in line or "holds" in line
    assert _outputs(tmp_path) == [] and _tree_hash(model) == src
    # the escape hatch: zeroed, said, and the output is finite
    assert main([*args, "--out", str(tmp_path / "q"), "--allow-nonfinite"]) == 0
    assert "set to 0" in capsys.readouterr().err
    out = load_file(tmp_path / "q" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in out.values() if t.is_floating_point())


def test_nonfinite_output_is_never_written():
    from llmq.errors import LlmqError
    from llmq.grid import IntGrid
    from llmq.methods.rtn import rtn_quantize
    from llmq.sinks import require_finite

    qt = rtn_quantize(torch.randn(8, 64), IntGrid(4, 32))
    qt.scales[2, 1] = float("nan")
    with pytest.raises(LlmqError, match="non-finite"):
        require_finite("x.weight", qt)
    with pytest.raises(LlmqError, match="non-finite"):
        require_finite("x.bias", torch.tensor([1.0, float("inf")]))


def test_eval_of_a_nonfinite_model_fails(model, tmp_path, capsys):
    w = load_file(model / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] * 1e30  # finite weights, a perplexity that overflows
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})
    code = main(["eval", "--quiet", "--model", str(model), "--dataset", str(need(TINYSTORIES)), "--seqlen", "64", "--max-windows", "2"])
    _user_error(capsys, code, "not finite")


# ---- outputs: overlap, locks, stale work, overwrite ------------------------------------------

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_out_may_not_touch_the_model(model, tmp_path, capsys, where):
    out = {"same": model, "parent": tmp_path, "inside": model / "q"}[where]
    (tmp_path / "unrelated.txt").write_text("keep me")
    src = _tree_hash(model)
    _user_error(capsys, main([*RTN, "--model", str(model), "--out", str(out), "--overwrite"]), "input")
    assert _tree_hash(model) == src and (tmp_path / "unrelated.txt").read_text() == "keep me"


def test_out_may_not_touch_the_calibration_text(model, tmp_path, capsys):
    text = tmp_path / "calib" / "text.txt"
    text.parent.mkdir()
    shutil.copy(need(TINYSTORIES), text)
    code = main(["quantize", "--quiet", "--method", "gptq", "--model", str(model), "--dataset", str(text),
                 "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "calib"), "--overwrite"])
    _user_error(capsys, code, "input")
    assert text.read_text() == need(TINYSTORIES).read_text()


def test_a_second_writer_is_refused(model, tmp_path, capsys):
    from llmq.output import Lock

    out = tmp_path / "q"
    held = Lock(out)
    held.acquire()  # another run is writing out
    try:
        _user_error(capsys, main([*RTN, "--model", str(model), "--out", str(out)]), "another llmq run")
    finally:
        held.release()
    assert not out.exists()
    assert main([*RTN, "--model", str(model), "--out", str(out)]) == 0


def test_overwrite_replaces_only_once_the_new_output_is_complete(model, tmp_path, capsys, monkeypatch):
    from llmq import sinks

    out = tmp_path / "q"
    assert main([*RTN, "--model", str(model), "--out", str(out)]) == 0
    before = _tree_hash(out)

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks, "copy_sidecars", fail)  # the new output fails at its very end
    _user_error(capsys, main([*RTN, "--bits", "8", "--model", str(model), "--out", str(out), "--overwrite"]), "no space left")
    assert _tree_hash(out) == before and _outputs(tmp_path) == ["q"]


@pytest.mark.parametrize("fmt", ["gptq", "gguf"])
def test_disk_full_is_one_line_and_leaves_nothing(model, tmp_path, capsys, monkeypatch, fmt):
    """A full disk (simulated: the writer's file writes fail with ENOSPC) ends the run with one line."""
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def opener(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if "llmq-tmp" in str(file) and ("w" in mode or "+" in mode) else f

    monkeypatch.setattr(builtins, "open", opener)
    out = tmp_path / ("q.gguf" if fmt == "gguf" else "q")
    args = ["--format", "gguf", "--gguf-type", "Q8_0"] if fmt == "gguf" else []
    _user_error(capsys, main([*RTN, *args, "--model", str(model), "--out", str(out)]), "no space left")
    monkeypatch.undo()
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize("gpu", [False, True])
def test_out_of_memory_is_one_line_and_leaves_nothing(model, tmp_path, capsys, monkeypatch, gpu):
    """An allocation that fails mid-run (the CPU allocator's own failure, or a GPU's OutOfMemoryError as torch
    raises it) ends the run with one line saying so, and no output."""
    try:
        torch.empty(2**50, dtype=torch.uint8)  # (1 PiB)
    except RuntimeError as e:
        failure = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore") if gpu else e

    def quantize_layer(*args, **kwargs):
        raise failure

    monkeypatch.setattr("llmq.methods.rtn.RTN.quantize_layer", quantize_layer)
    line = _user_error(capsys, main([*RTN, "--model", str(model), "--out", str(tmp_path / "q")]), "out of memory")
    assert ("Tried to allocate 2.00 GiB" if gpu else "an allocation of 1048576.00 GiB failed") in line
    assert _outputs(tmp_path) == []


def test_disk_full_on_a_real_small_filesystem(model, tmp_path, capsys):
    """The same on a 64 KiB tmpfs, where the machine lets us mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        _user_error(capsys, main([*RTN, "--bits", "8", "--model", str(model), "--out", str(mnt / "q")]), "no space left")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---- corrupt inputs -------------------------------------------------------------------------

def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("damage", ["truncated", "length", "json", "dtype"])
def test_corrupt_safetensors_is_one_line(model, tmp_path, capsys, damage):
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = _header_len(f)
    if damage == "truncated":
        data = data[: len(data) - 1000]
    elif damage == "length":
        data[:8] = struct.pack("<Q", n + 4096)
    elif damage == "json":
        data[8 + n // 2] = ord("{")
    else:
        header = data[8 : 8 + n].decode()
        data[8 : 8 + n] = header.replace('"F32"', '"I32"', 1).encode()  # same width: a valid file of ints
    f.write_bytes(bytes(data))
    src = _tree_hash(model)
    for argv in ([*RTN, "--model", str(model), "--out", str(tmp_path / "q")],
                 ["eval", "--quiet", "--model", str(model), "--dataset", str(need(TINYSTORIES)), "--seqlen", "64"]):
        _user_error(capsys, main(argv), "model" if damage == "dtype" else "safetensors")
    assert _tree_hash(model) == src and _outputs(tmp_path) == []


def test_corrupt_provenance_is_one_line(model, tmp_path, capsys):
    out = tmp_path / "q"
    assert main([*RTN, "--model", str(model), "--out", str(out)]) == 0
    (out / "llmq_provenance.json").write_text('{"files_sha256": {"model.safetensors": ')
    _user_error(capsys, main(["verify", str(out)]), "provenance")


@pytest.mark.parametrize("flags,needle", [(["--block-size", "0"], "block-size"), (["--block-size", "-3"], "block-size"),
                                          (["--block-size", "0", "--group-size", "-1"], "block-size"),
                                          (["--group-size", "0"], "group-size"), (["--damp", "2"], "damp"),
                                          (["--nsamples", "0"], "nsamples"), (["--seqlen", "1"], "seqlen")])
def test_bad_flag_values(model, tmp_path, capsys, flags, needle):
    code = main(["quantize", "--quiet", "--method", "gptq", "--model", str(model), "--out", str(tmp_path / "q"), *flags])
    _user_error(capsys, code, needle)
    assert _outputs(tmp_path) == []


def test_jsonl_without_text_is_refused(model, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "content": "once upon a time " * 20}) for i in range(50)))
    code = main(["quantize", "--quiet", "--method", "gptq", "--model", str(model), "--dataset", str(data),
                 "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "q")])
    _user_error(capsys, code, "'text'", "id, content")


# ---- remote code, warnings -------------------------------------------------------------------

def test_remote_code_model_keeps_its_code(model, tmp_path, capsys):
    (model / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny_remote'\n")
    (model / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyConfig\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="tiny_remote", architectures=["TinyForCausalLM"],
               auto_map={"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "q"
    assert main([*RTN, "--model", str(model), "--out", str(out), "--trust-remote-code"]) == 0
    assert (out / "configuration_tiny.py").is_file() and (out / "modeling_tiny.py").is_file()
    from transformers import AutoConfig

    assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__name__ == "TinyConfig"


def test_other_libraries_warnings_are_theirs(tmp_path, capsys):
    """gguf's tokenizer warnings come out under gguf's name, not as llmq's."""
    from conftest import REF6M

    p = subprocess.run([sys.executable, "-m", "llmq", "export", "--model", str(need(REF6M)), "--format", "gguf",
                        "--gguf-type", "F16", "--out", str(tmp_path / "m.gguf")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    err = p.stderr
    assert "gguf.vocab: TemplateProcessing" in err
    assert all(not l.startswith("llmq:") for l in err.splitlines() if "TemplateProcessing" in l)


# ---- interruption and resume ------------------------------------------------------------------

def _recipe(model: Path, fmt: str) -> list[str]:
    args = ["quantize", "--quiet", "--method", "gptq", "--model", str(model), "--dataset", str(need(C4)),
            "--nsamples", "8", "--seqlen", "64"]
    if fmt == "signround":  # (carries the unquantized model's activations: a resume must rebuild them)
        args = [*args, "--method", "signround", "--iters", "4"]
    return [*args, "--format", "gguf", "--gguf-type", "Q4_0"] if fmt == "gguf" else [*args, "--bits", "4", "--group-size", "32"]


def _weights(out: Path) -> dict[str, str]:
    """Every output file that does not record times."""
    if out.is_file():
        return {out.name: hashlib.sha256(out.read_bytes()).hexdigest()}
    return {k: v for k, v in _tree_hash(out).items() if k not in ("llmq_provenance.json", "llmq_quantize_log.jsonl")}


@pytest.mark.parametrize("fmt", ["gptq", "gguf", "signround"])
def test_interrupted_then_resumed_run_is_byte_identical(model, tmp_path, capsys, monkeypatch, fmt):
    from llmq import journal

    clean = tmp_path / ("clean.gguf" if fmt == "gguf" else "clean")
    assert main([*_recipe(model, fmt), "--out", str(clean)]) == 0
    out = tmp_path / ("q.gguf" if fmt == "gguf" else "q")
    record = journal.Journal.record

    def interrupt_after_layer_2(self, i, entry, state):
        record(self, i, entry, state)
        if i == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(journal.Journal, "record", interrupt_after_layer_2)
    assert main([*_recipe(model, fmt), "--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err and not out.exists()
    monkeypatch.undo()
    _user_error(capsys, main([*_recipe(model, fmt), "--seed", "1", "--out", str(out), "--resume"]), "other settings")
    assert main([*_recipe(model, fmt), "--out", str(out), "--resume"]) == 0
    assert "resuming after layer 3" in capsys.readouterr().err
    assert _weights(out) == {k.replace("clean", "q"): v for k, v in _weights(clean).items()}
    assert _outputs(tmp_path) == sorted([clean.name, out.name])


def test_resume_without_an_interrupted_run(model, tmp_path, capsys):
    _user_error(capsys, main([*_recipe(model, "gptq"), "--out", str(tmp_path / "q"), "--resume"]), "no interrupted run")


def _run_until_journaled(argv: list[str], work: Path, layers: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "llmq", *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    head = work / ".llmq-journal" / "journal.json"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            if json.loads(head.read_text())["layers"] >= layers:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return p


@pytest.mark.slow  # (tens of seconds; runs with -m slow)
def test_kill_9_then_rerun_cleans_or_resumes(model, tmp_path):
    """A run killed outright leaves its work directory; the next run without --resume removes it (no one
    holds its lock), and a run with --resume finishes it into the same bytes as a clean run."""
    clean, out = tmp_path / "clean", tmp_path / "q"
    assert subprocess.run([sys.executable, "-m", "llmq", *_recipe(model, "gptq"), "--out", str(clean)], cwd=ROOT).returncode == 0
    work = tmp_path / ".q.llmq-tmp"
    for resume in (False, True):
        p = _run_until_journaled([*_recipe(model, "gptq"), "--out", str(out)], work, 2)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert work.is_dir() and not out.exists()
        argv = [*_recipe(model, "gptq"), "--out", str(out), *(["--resume"] if resume else [])]
        assert subprocess.run([sys.executable, "-m", "llmq", *argv], cwd=ROOT, capture_output=True).returncode == 0
        assert not work.exists() and not any(p.name.startswith(".q.") for p in tmp_path.iterdir())
        assert _weights(out) == _weights(clean)
        shutil.rmtree(out)


def test_sigterm_stops_like_ctrl_c(model, tmp_path):
    out = tmp_path / "q"
    p = _run_until_journaled([*_recipe(model, "gptq"), "--out", str(out)], tmp_path / ".q.llmq-tmp", 1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 130 and not out.exists()


def _swallows_interrupts(real):
    """A tensor read as safetensors' reader behaved when a signal landed inside get_tensor: the
    KeyboardInterrupt is lost and a ValueError of its own comes out (seen with a timer signal on safetensors
    0.7; any library llmq calls may do the same)."""

    def read(self, path, key: str):
        if ".layers.2." in key:
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises KeyboardInterrupt right here
            except KeyboardInterrupt:
                raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        return real(self, path, key)

    return read


def test_an_interrupt_a_library_swallows_still_stops_for_resume(model, tmp_path, capsys, monkeypatch):
    from llmq import source

    clean, out = tmp_path / "clean", tmp_path / "q"
    assert main([*_recipe(model, "gptq"), "--out", str(clean)]) == 0
    monkeypatch.setattr(source.Header, "read", _swallows_interrupts(source.Header.read))
    assert main([*_recipe(model, "gptq"), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "cannot read" not in err and not out.exists()
    monkeypatch.undo()
    assert main([*_recipe(model, "gptq"), "--out", str(out), "--resume"]) == 0
    assert _weights(out) == {k.replace("clean", "q"): v for k, v in _weights(clean).items()}


# ---- fuzzing the checkpoint readers ------------------------------------------------------------

def _corrupt(original: Path, mutated: Path) -> bool:
    """Whether safetensors' own reader rejects the file, or reads a tensor under its name with another dtype or
    shape.  (A flip that renames a tensor makes a readable file that lacks one; whether that matters is the
    reader's business: a GPTQ g_idx is optional, a weight is not.  Either answer is fine, a traceback is not.)"""
    try:
        got = load_file(mutated)
    except Exception:
        return True
    want = load_file(original)
    return any(k in got and (got[k].dtype, got[k].shape) != (v.dtype, v.shape) for k, v in want.items())


def _fuzz(command, src_dir: Path, data_file: str):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    original = (src_dir / data_file).read_bytes()
    n = struct.unpack("<Q", original[:8])[0]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(kind=st.sampled_from(["truncate", "header"]), pos=st.integers(0, 10**9), value=st.integers(0, 255))
    def run(kind, pos, value):
        data = bytearray(original)
        if kind == "truncate":
            data = data[: pos % len(data)]
        else:
            data[pos % (8 + n)] = value
        (src_dir / data_file).write_bytes(bytes(data))
        before = _tree_hash(src_dir)
        code = command()
        assert _tree_hash(src_dir) == before  # the source is never modified
        if _corrupt(src_dir.parent / "pristine", src_dir / data_file):
            assert code != 0, (kind, pos, value)

    (src_dir.parent / "pristine").write_bytes(original)
    run()


@pytest.mark.parametrize("command", ["quantize", "eval", "export"])
def test_fuzzed_safetensors_never_crash(model, tmp_path, capsys, command):
    """Mutated headers and truncations at random offsets: never a traceback (an exception here), never exit 0
    when the file is corrupt, the source never modified."""
    if command == "export":
        q = tmp_path / "src-q"
        assert main([*RTN, "--model", str(model), "--out", str(q)]) == 0
        src = q
    else:
        src = model
    out = tmp_path / "out"

    def run() -> int:
        argv = {"quantize": [*RTN, "--model", str(src), "--out", str(out), "--overwrite"],
                "eval": ["eval", "--quiet", "--model", str(src), "--dataset", str(need(TINYSTORIES)), "--seqlen", "64",
                         "--max-windows", "1"],
                "export": ["export", "--model", str(src), "--format", "compressed-tensors", "--out", str(out), "--overwrite"]}[command]
        code = main(argv)
        capsys.readouterr()
        return code

    _fuzz(run, src, "model.safetensors")
