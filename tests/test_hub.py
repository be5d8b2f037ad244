"""Model card and upload: the card parses with huggingface_hub, the upload goes to a local recording endpoint."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, STORIES, need
from llmq.recipe import build_config
from llmq.pipeline import quantize_model
from llmq.provenance import verify
from llmq.source import ModelSource

TOKEN = "hf_llmqTestTokenThatMustNotLeak0123"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    need(STORIES)
    out = tmp_path_factory.mktemp("hub") / "q"
    quantize_model(ModelSource(str(STORIES)), build_config({}, {"method": "rtn", "bits": 4, "group_size": 32}), out, progress=False)
    return out


def test_dry_run_card_parses(ckpt, tmp_path):
    """The card parses as a Hub model card; a dry run lists it but writes nothing into the checkpoint."""
    from huggingface_hub import ModelCard

    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    p = subprocess.run([sys.executable, "-m", "llmq", "push", str(ckpt), "--repo-id", "someone/stories-w4", "--dry-run",
                        "--base-model", "karpathy/tinyllamas", "--card", str(tmp_path / "card.md")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "model.safetensors" in p.stdout and "README.md" in p.stdout
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before  # the user's folder is untouched
    card = ModelCard.load(tmp_path / "card.md")
    assert card.data.base_model == "karpathy/tinyllamas"
    assert card.data.library_name == "transformers"
    assert {"llmq", "rtn", "4-bit"} <= set(card.data.tags)
    assert card.data.to_dict()["quantized_by"] == "llmq"
    assert "vllm serve someone/stories-w4" in card.text
    assert verify(ckpt) == []  # the card is documentation: provenance still verifies


class _Hub(BaseHTTPRequestHandler):
    log: list = []

    def log_message(self, *a):  # quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.log.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if self.path == "/api/repos/create":
            req = json.loads(body)
            host = self.headers["Host"]
            return self._reply(200, {"url": f"http://{host}/{req.get('organization')}/{req['name']}", "name": req["name"]})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in self.path:
            host = self.headers["Host"]
            return self._reply(200, {"commitUrl": f"http://{host}/someone/stories-w4/commit/{'a' * 40}", "commitOid": "a" * 40,
                                     "pullRequestUrl": None})
        return self._reply(404, {"error": f"unexpected {self.path}"})

    def do_GET(self):
        self.log.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, b""))
        return self._reply(404, {"error": f"unexpected {self.path}"})


def _push_to_local_hub(*args: str) -> subprocess.CompletedProcess:
    """`llmq push ARGS` against a local recording endpoint (what it received: _Hub.log)."""
    _Hub.log = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": TOKEN,
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
        return subprocess.run([sys.executable, "-m", "llmq", "push", *args], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=120)
    finally:
        server.shutdown()


def _sent_files() -> dict[str, bytes]:
    """The files of the one commit the local endpoint received."""
    commits = [r for r in _Hub.log if "/commit/" in r[1]]
    assert len(commits) == 1
    lines = [json.loads(l) for l in commits[0][3].decode().splitlines() if l.strip()]
    return {l["value"]["path"]: base64.b64decode(l["value"]["content"]) for l in lines if l["key"] == "file"}


def test_upload_to_local_endpoint(ckpt):
    p = _push_to_local_hub(str(ckpt), "--repo-id", "someone/stories-w4", "--private")
    assert p.returncode == 0, p.stdout + p.stderr
    assert TOKEN not in p.stdout + p.stderr
    create = [r for r in _Hub.log if r[1] == "/api/repos/create"]
    req = json.loads(create[0][3])
    assert req.get("private") is True or req.get("visibility") == "private"
    assert create[0][2].get("authorization") == f"Bearer {TOKEN}"
    validated = [json.loads(r[3]) for r in _Hub.log if r[1] == "/api/validate-yaml"]
    assert validated and "quantized_by: llmq" in validated[0]["content"]
    assert any("/commit/" in r[1] and "someone/stories-w4" in r[1] for r in _Hub.log)
    sent = _sent_files()
    expected = sorted(str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file())
    assert sorted(sent) == sorted([*expected, "README.md"]) and not (ckpt / "README.md").exists()
    assert sent["model.safetensors"] == (ckpt / "model.safetensors").read_bytes()
    assert b"quantized_by: llmq" in sent["README.md"]


def test_card_of_an_export_names_the_method_and_the_format(tmp_path):
    """A GPTQ checkpoint re-packed as AWQ GEMM: its codes were chosen by GPTQ, its layout is AWQ's."""
    from huggingface_hub import ModelCard

    from conftest import C4, REF6M
    from llmq.export import export_checkpoint
    from llmq.hub import model_card

    need(REF6M)
    cfg = build_config({}, {"method": "gptq", "bits": 4, "group_size": 128, "dataset": str(need(C4)), "nsamples": 4, "seqlen": 64})
    quantize_model(ModelSource(str(REF6M)), cfg, tmp_path / "gptq", progress=False)
    export_checkpoint(str(tmp_path / "gptq"), "awq", tmp_path / "awq")
    export_checkpoint(str(tmp_path / "awq"), "compressed-tensors", tmp_path / "ct")  # an export of an export
    for fmt in ("awq", "ct"):
        (tmp_path / "card.md").write_text(model_card(tmp_path / fmt))
        card = ModelCard.load(tmp_path / "card.md")
        layout = {"awq": "awq", "ct": "compressed-tensors"}[fmt]
        assert "codes chosen by **gptq**" in card.text and f"checkpoint format `{layout}`" in card.text
        assert {"gptq", layout} <= set(card.data.tags)


def test_verify_reads_every_file_once(ckpt, monkeypatch):
    from llmq import provenance

    read = []
    real = provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda p, *a: read.append(p.name) or real(p, *a))
    assert verify(ckpt) == []
    assert len(read) == len(set(read)) and "model.safetensors" in read


def test_gguf_file_is_pushed_alone_with_a_card_from_its_metadata(tmp_path):
    """A GGUF file goes up as it is, beside a card built from the provenance in its metadata; nothing beside
    it in its directory goes along, and the file is not touched."""
    import hashlib

    from huggingface_hub import ModelCard

    from conftest import REF6M

    need(REF6M)
    gguf_file = tmp_path / "ref-q8.gguf"
    quantize_model(ModelSource(str(REF6M)), build_config({}, {"method": "rtn", "format": "gguf", "gguf_type": "Q8_0"}),
                   gguf_file, progress=False)
    (tmp_path / "notes.txt").write_text("not part of the upload")
    before = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    p = _push_to_local_hub(str(gguf_file), "--repo-id", "someone/ref-gguf", "--base-model", "someone/ref",
                           "--card", str(tmp_path / "card.md"))
    assert p.returncode == 0, p.stdout + p.stderr
    sent = _sent_files()
    assert sorted(sent) == ["README.md", "ref-q8.gguf"] and sent["ref-q8.gguf"] == gguf_file.read_bytes()
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == before
    card = ModelCard.load(tmp_path / "card.md")
    assert card.text.strip() in sent["README.md"].decode()
    assert {"llmq", "gguf", "rtn", "Q8_0"} <= set(card.data.tags) and card.data.base_model == "someone/ref"
    assert f"`{REF6M}`" in card.text and "--hf-file ref-q8.gguf" in card.text and 'gguf_file="ref-q8.gguf"' in card.text


def test_push_refuses_what_is_no_checkpoint_and_verify_explains_gguf(tmp_path, capsys):
    from llmq.cli import main

    (tmp_path / "x.bin").write_bytes(b"0")
    assert main(["push", str(tmp_path / "x.bin"), "--repo-id", "someone/x", "--dry-run"]) != 0
    err = capsys.readouterr().err
    assert "neither a checkpoint directory" in err and "Traceback" not in err
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert main(["verify", str(tmp_path / "x.gguf")]) != 0
    err = capsys.readouterr().err
    assert "is a GGUF file" in err and "llmq.provenance" in err and "Traceback" not in err


def test_card_of_a_gguf_file_llmq_did_not_write_claims_nothing(tmp_path):
    import gguf
    import numpy as np
    from huggingface_hub import ModelCard

    from llmq.hub import gguf_card

    w = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "card.md").write_text(gguf_card(tmp_path / "other.gguf"))
    card = ModelCard.load(tmp_path / "card.md")
    assert set(card.data.tags) == {"gguf"} and "quantized_by" not in card.data.to_dict()
    assert "llmq did not write it" in card.text and "Quantized with" not in card.text
