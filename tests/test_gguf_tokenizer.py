"""GGUF tokenizers: llama.cpp splits text exactly as the HF tokenizer does.

llama.cpp tokenizes from the file alone (scores, merges, pre-tokenizer regex, space prefix, BOS), so a
file whose tokenizer tables are off computes a different perplexity even when every weight is right.
Each kind of tokenizer a published model ships is built here from the shared assets (SentencePiece with
and without a space prefix, converted SentencePiece without tokenizer.model, byte-level BPE with the
GPT-2, SmolLM, Llama 3 and Qwen2 pre-tokenizers) and compared with llama.cpp's own tokenizer (optional
extra) on real text; without llama.cpp the tables are checked against sentencepiece and tokenizer.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, REF6M, STORIES, WIKI_TEST, need
from llmq.export import export_gguf
from llmq.gguf.vocab import CONTROL, SPLIT_REGEXES, read_tokenizer

LLAMA2_SPM = ASSETS / "tokenizers" / "llama2-spm" / "tokenizer.model"
TINYSTORIES_TEXT = ASSETS / "datasets" / "tinystories" / "valid-sample.txt"
EXTRA = ("\n Hello,  world!! It's 12345 tokens...\t tabs\n\n  two  spaces  é ü ß naïve café 中文 日本語 😀\n"
         "x = [1, 2, 3]; y = f(x) ** 2  # code\n    indented\r\nCRLF line\n'quoted' \"double\" — dash… ellipsis")


def _text() -> str:
    import pandas as pd

    rows = pd.read_parquet(need(WIKI_TEST))["text"][:300]
    return "\n\n".join(rows) + EXTRA


def _hf_tokenizer_dir(path: Path, spm_model: Path, cls: str, **special) -> Path:
    """A HF tokenizer (tokenizer.json from transformers' own converter, and the tokenizer.model) for a SentencePiece model."""
    from transformers import AutoTokenizer

    pytest.importorskip("google.protobuf")  # transformers' converter reads the model's protobuf
    path.mkdir(parents=True)
    shutil.copy(spm_model, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, **special}))
    AutoTokenizer.from_pretrained(path).save_pretrained(path)
    return path


def _gemma_like_spm(tmp: Path) -> Path:
    """A SentencePiece BPE model as Gemma's are made: no space prefix, byte fallback, digits split."""
    import sentencepiece as spm

    corpus = tmp / "corpus.txt"
    corpus.write_text(need(TINYSTORIES_TEXT).read_text() + _text()[:200_000])
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp / "gemma-like"), vocab_size=1000, model_type="bpe",
                                   add_dummy_prefix=False, byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    return tmp / "gemma-like.model"


def _with_pre_tokenizer(path: Path, regex: str) -> Path:
    """llmq-ref-6m's byte-level BPE with a Split(regex) + ByteLevel pre-tokenizer (as Llama 3 and Qwen2 ship)."""
    path.mkdir(parents=True)
    tj = json.loads((need(REF6M) / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (path / "tokenizer.json").write_text(json.dumps(tj))
    shutil.copy(REF6M / "tokenizer_config.json", path / "tokenizer_config.json")
    return path


def _copy(src_files: list[Path], path: Path) -> Path:
    path.mkdir(parents=True)
    for f in src_files:
        shutil.copy(need(f), path / f.name)
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """kind -> a function building (once) a directory with that kind of tokenizer."""
    tmp = tmp_path_factory.mktemp("tokenizers")
    stories = [STORIES / f for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")]
    tok_dirs = {
        "llama2-spm": lambda: _hf_tokenizer_dir(tmp / "llama2", need(LLAMA2_SPM), "LlamaTokenizer",
                                                bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        "gemma-spm": lambda: _hf_tokenizer_dir(tmp / "gemma", _gemma_like_spm(tmp), "GemmaTokenizer", bos_token="<s>",
                                               eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True),
        "stories-spm": lambda: _copy(stories, tmp / "stories"),
        "stories-json-only": lambda: _copy([f for f in stories if f.name != "tokenizer.model"], tmp / "stories-json"),
        "gpt2-bpe": lambda: _copy([REF6M / "tokenizer.json", REF6M / "tokenizer_config.json"], tmp / "ref6m"),
        "gpt-neox": lambda: _copy([ASSETS / "tokenizers" / "gpt-neox" / f for f in ("tokenizer.json", "tokenizer_config.json",
                                                                                       "special_tokens_map.json")], tmp / "neox"),
        "smollm": lambda: _copy([ASSETS / "tokenizers" / "smollm2" / "tokenizer.json"], tmp / "smollm"),
        **{name: (lambda r=regex, n=name: _with_pre_tokenizer(tmp / n, r)) for regex, name in SPLIT_REGEXES.items()},
    }
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = tok_dirs[kind]()
        return built[kind]

    return get


def _model_with(tok_dir: Path, path: Path) -> Path:
    """A one-layer random Llama whose embedding fits the tokenizer, saved with it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


KINDS = ["llama2-spm", "gemma-spm", "stories-spm", "stories-json-only", "gpt2-bpe", "gpt-neox", "smollm", *SPLIT_REGEXES.values()]


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_tokenizes_as_the_model_does(tmp_path, tokenizers, kind):
    """With llama-cpp-python: the same token ids for ~45k tokens of wikitext plus digits, code, whitespace
    runs and non-Latin text; BOS added as HF adds it.  The reference is the tokenizer the model was made
    with: sentencepiece where a tokenizer.model is shipped (HF's conversion of Llama 2's differs from it on
    runs of spaces; llama.cpp, like convert_hf_to_gguf's files, follows sentencepiece), else HF's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    model = _model_with(tokenizers(kind), tmp_path / "m")
    export_gguf(str(model), tmp_path / "m.gguf", "F32")
    text = _text()
    hf = AutoTokenizer.from_pretrained(model)
    want = hf(text)["input_ids"]
    if (model / "tokenizer.model").is_file():
        import sentencepiece as spm

        want = want[:1] * (want[:1] == [hf.bos_token_id]) + spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model")).encode(text)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    adds_bos = want[:1] == [hf.bos_token_id] if hf.bos_token_id is not None else False
    got = llm.tokenize(text.encode(), add_bos=adds_bos, special=True)
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    assert got == want, (kind, len(want), len(got), first, hf.convert_ids_to_tokens(want[first : first + 4]),
                         hf.convert_ids_to_tokens(got[first : first + 4]))


def test_sentencepiece_tables_are_the_models_own(tokenizers):
    """Scores and kinds of every piece as sentencepiece gives them (never a placeholder score), and the space
    prefix as the HF tokenizer applies it: Llama 2 puts one before the text, Gemma does not."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    for kind, prefix in (("llama2-spm", True), ("gemma-spm", False)):
        d = tokenizers(kind)
        sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        n = len(AutoTokenizer.from_pretrained(d))  # the pieces and any tokens HF adds after them
        tok = read_tokenizer(d, n + 5)
        assert tok.model == "llama" and tok.add_space_prefix is prefix
        assert tok.scores[: sp.vocab_size()] == [sp.GetScore(i) for i in range(sp.vocab_size())]
        assert tok.tokens[: sp.vocab_size()] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
        assert tok.tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 5)]  # padded to the embedding
        assert tok.types[sp.bos_id()] == CONTROL


def test_converted_sentencepiece_scores_follow_the_merge_ranks(tokenizers):
    """Without tokenizer.model, each merged token scores below every token made by an earlier merge."""
    d = tokenizers("stories-json-only")
    tj = json.loads((d / "tokenizer.json").read_text())
    tok = read_tokenizer(d, 512)
    vocab = tj["model"]["vocab"]
    merged = ["".join(m.split(" ", 1) if isinstance(m, str) else m) for m in tj["model"]["merges"]]
    scores = [tok.scores[vocab[t]] for t in dict.fromkeys(merged)]
    assert len(set(tok.scores)) > 100 and scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("kind,pre", [("gpt2-bpe", "gpt-2"), ("gpt-neox", "gpt-2"), ("smollm", "smollm"),
                                      *((name, name) for name in SPLIT_REGEXES.values())])
def test_byte_level_pre_tokenizer_names(tokenizers, kind, pre):
    d = tokenizers(kind)
    assert read_tokenizer(d, 60000).pre == pre


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from llmq.errors import LlmqError

    d = _with_pre_tokenizer(tmp_path / "t", r"\p{L}+|\s+")
    with pytest.raises(LlmqError, match="pre-tokenizer"):
        read_tokenizer(d, 5000)


def test_check_gguf_places_a_difference(tmp_path, monkeypatch):
    """`llmq check-gguf` (llama.cpp extra): a faithful file agrees on tokens and logits; a file whose
    pre-tokenizer is wrong is caught by the tokenizer comparison while its logits still agree."""
    pytest.importorskip("llama_cpp")
    from llmq.gguf import vocab
    from llmq.gguf.check import check_gguf

    wiki = str(need(WIKI_TEST))
    export_gguf(str(need(REF6M)), tmp_path / "good.gguf", "F32")
    tokens, r = check_gguf(tmp_path / "good.gguf", str(REF6M), wiki, seqlen=256, max_windows=4, progress=False)
    assert tokens.agrees and r.kld < 1e-5 and r.top1 > 0.99 and abs(r.ppl / r.reference_ppl - 1) < 1e-3
    monkeypatch.setattr(vocab, "_pre_name", lambda tj: "default")  # (what llmq wrote for Llama-family BPE before)
    export_gguf(str(REF6M), tmp_path / "bad.gguf", "F32")
    tokens, r = check_gguf(tmp_path / "bad.gguf", str(REF6M), wiki, seqlen=256, max_windows=4, progress=False)
    assert not tokens.agrees and tokens.first_difference < 10 and r.kld < 1e-5


def test_check_gguf_without_llama_cpp_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from llmq.errors import LlmqError
    from llmq.gguf.check import LlamaCppModel

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(LlmqError, match=r"pip install llmq\[llamacpp\]"):
        LlamaCppModel(tmp_path / "x.gguf", 64)
