"""Model access without loading the model.

A :class:`ModelSource` resolves a hub id or local directory, builds the model
skeleton on the ``meta`` device, and reads individual tensors lazily from the
safetensors shards.  The pipeline materializes one decoder layer at a time through
:meth:`ModelSource.materialize` and frees it with :func:`release`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
import torch
from safetensors import safe_open
from torch import nn

from llmq.dtypes import FLOAT_DTYPES
from llmq.errors import LlmqError
from llmq.experts import unfuse_experts
from llmq.provenance import sha256_file
from llmq.safetensors_stream import Header

log = logging.getLogger("llmq")

# What a quantization run needs from a hub repository (no .bin/.h5/.msgpack duplicates).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


def resolve_model_dir(model: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; anything else is treated as a Hugging Face Hub repo id."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise LlmqError(f"model path {model!r} is a file, expected a directory or a hub id")
    looks_local = model.startswith((".", "/", "~")) or os.sep + os.sep in model or model.count("/") > 1
    if looks_local:
        raise LlmqError(f"model directory {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, revision=revision, allow_patterns=allow_patterns or HUB_PATTERNS))
    except Exception as e:  # network, auth, not found: all are the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmqError(f"{model!r} is not a local directory and could not be fetched from the Hugging Face Hub: {first}") from None


class ModelSource:
    def __init__(self, model: str, revision: str | None = None, trust_remote_code: bool = False,
                 allow_nonfinite: bool = False):
        self.name = model
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        # A NaN or Inf weight would reach every scale of its group and every output: refused, or (asked for) zeroed.
        self.allow_nonfinite = allow_nonfinite
        self.dir = resolve_model_dir(model, revision)
        if not (self.dir / "config.json").is_file():
            raise LlmqError(f"{model!r} has no config.json; is it a transformers model directory?")
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(self.dir, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise LlmqError(f"cannot read the config of {model!r}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
        self._index = self._build_index()
        self.base_prefix = ""  # the model class's base_model_prefix, known once skeleton() ran
        self._key_map: dict[str, str] = {}  # model parameter name -> checkpoint key, known once skeleton() ran
        self._module_map: dict[str, str] = {}  # module name -> its tensors' checkpoint prefix, likewise
        self.tied: dict[str, str] = {}  # parameter stored under another name (tied embeddings)
        self.transposed: set[str] = set()  # weights of Conv1D modules, stored (in, out) on disk
        self._hashes: dict[str, str] | None = None  # file_hashes(), once computed
        self._headers: dict[Path, Header] = {}  # each safetensors file's header, parsed once

    @property
    def display_name(self) -> str:
        """The model's name as files name it: a local directory's name, or a hub id's last part (never
        the name of a snapshot or staging directory)."""
        return Path(self.name.rstrip("/")).name or self.dir.resolve().name

    # ---- tensors on disk -------------------------------------------------
    def _build_index(self) -> dict[str, Path]:
        index_file = self.dir / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
                index = {k: self.dir / v for k, v in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise LlmqError(f"{str(index_file)!r} is not a readable shard index: {_first_line(e)}") from None
            for f in set(index.values()):
                if not f.is_file():
                    raise LlmqError(f"the shard index of {self.name!r} names {f.name}, which is missing")
                if not set(_keys(f)) >= {k for k, v in index.items() if v == f}:
                    raise LlmqError(f"{str(f)!r} lacks tensors its shard index puts there")
            return index
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
                raise LlmqError(f"{self.name!r} has only PyTorch .bin weights; llmq reads safetensors (convert the checkpoint first)")
            raise LlmqError(f"{self.name!r} contains no .safetensors weights")
        index: dict[str, Path] = {}
        for f in files:
            for k in _keys(f):
                index[k] = f
        return index

    def files(self) -> list[Path]:
        """The source's config and weight files (for provenance hashes)."""
        out = {self.dir / "config.json", *self._index.values()}
        idx = self.dir / "model.safetensors.index.json"
        if idx.is_file():
            out.add(idx)
        return sorted(out)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each of ``files()`` by its path in the source (read once per source: a GGUF run with a
        size budget needs them for its sizing and for its file)."""
        if self._hashes is None:
            self._hashes = {str(p.relative_to(self.dir)): sha256_file(p) for p in self.files()}
        return self._hashes

    def checkpoint_key(self, name: str) -> str | None:
        """Map a module state-dict name to the key stored on disk (prefix differences, tied heads)."""
        if name in self._key_map:
            return self._key_map[name]
        if name in self._index:
            return name
        prefix = self.base_prefix
        candidates = []
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        if prefix:
            candidates.append(f"{prefix}.{name}")
        for c in candidates:
            if c in self._index:
                return c
        if name in self.tied:
            return self.checkpoint_key(self.tied[name])
        return None

    def module_key(self, module: str) -> str:
        """The checkpoint prefix of a module's tensors ("...block_sparse_moe.experts.3.w1" for transformers'
        "...mlp.experts.3.w1"): module and checkpoint names can differ, in plain and packed checkpoints."""
        if f"{module}.weight" in self.tied:  # a tied head is stored as the embedding, but it is its own module
            return module
        key = self.checkpoint_key(f"{module}.weight")
        return key[: -len(".weight")] if key else self._module_map.get(module, module)

    def has_tensor(self, name: str) -> bool:
        return self.checkpoint_key(name) is not None

    def identity(self) -> dict:
        """What identifies these weights cheaply: the name and every file's name and size."""
        return {"name": self.name, "revision": self.revision,
                "files": {str(p.relative_to(self.dir)): p.stat().st_size for p in self.files()}}

    def load_tensor(self, name: str) -> torch.Tensor:
        key = self.checkpoint_key(name)
        if key is None:
            raise LlmqError(f"tensor {name!r} is missing from the checkpoint of {self.name!r}")
        path = self._index[key]
        try:
            if path not in self._headers:
                self._headers[path] = Header(path)
            t = _read(self._headers[path], path, key)
        except Exception as e:  # a truncated or corrupted file: the user's to replace
            raise LlmqError(f"cannot read tensor {key!r} from {str(path)!r}: {_first_line(e)}") from None
        if t.is_floating_point():
            t = self._finite(key, t)
        return t.T.contiguous() if name in self.transposed else t

    def load_like(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The tensor of model parameter ``name``, checked against the parameter's shape and kind."""
        t = self.load_tensor(name)
        if t.shape != param.shape:
            raise LlmqError(f"tensor {name!r} has shape {tuple(t.shape)} on disk but {tuple(param.shape)} in the model config")
        if t.is_floating_point() != param.is_floating_point():
            raise LlmqError(f"tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')} on disk but the model "
                            f"needs {str(param.dtype).removeprefix('torch.')}")
        return t

    def _finite(self, key: str, t: torch.Tensor) -> torch.Tensor:
        bad = int((~torch.isfinite(t)).sum())
        if not bad:
            return t
        if not self.allow_nonfinite:
            raise LlmqError(f"tensor {key!r} of {self.name!r} holds {bad} non-finite values (NaN/Inf); "
                            "fix the checkpoint, or pass --allow-nonfinite to zero them")
        log.warning("tensor %s: %d non-finite values set to 0 (--allow-nonfinite)", key, bad)
        return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

    def stored(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A model tensor in the layout the checkpoint keeps it in (the inverse of load_tensor's)."""
        return tensor.T.contiguous() if name in self.transposed else tensor

    # ---- the model skeleton ----------------------------------------------
    def skeleton(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The causal LM with every parameter on the meta device (buffers stay real)."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.config.use_cache = False
        archs = getattr(self.config, "architectures", None) or []
        if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
            raise LlmqError(f"{self.name!r} is not a causal language model (architectures: {', '.join(archs)})")
        if getattr(self.config, "is_encoder_decoder", False):
            raise LlmqError(f"{self.name!r} is an encoder-decoder model; llmq quantizes decoder-only causal LMs")
        try:
            with init_empty_weights(include_buffers=False), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(self.config, dtype=dtype, trust_remote_code=self.trust_remote_code)
        except ValueError as e:
            raise LlmqError(f"{self.name!r} is not a causal language model ({type(self.config).__name__}): {str(e).splitlines()[0]}") from None
        model.eval()
        self.transposed = _linears_for_conv1d(model)
        unfuse_experts(model)  # per-expert linears, under the names the checkpoint stores them by
        self.base_prefix = model.base_model_prefix or ""
        self._key_map = _checkpoint_names(model, list(self._index))
        self._module_map = {name.rpartition(".")[0]: key.rpartition(".")[0] for name, key in self._key_map.items()
                            if name.rpartition(".")[2] == key.rpartition(".")[2]}
        tied = getattr(model, "_tied_weights_keys", None)
        self.tied = {}  # (has_tensor answers for tied names too: a second skeleton must not see the first's map)
        if getattr(self.config, "tie_word_embeddings", False) and isinstance(tied, dict):
            # e.g. {"lm_head.weight": "model.embed_tokens.weight"}: the checkpoint stores only the target
            self.tied = {k: v for k, v in tied.items() if not self.has_tensor(k)}
        return model

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.dir, trust_remote_code=self.trust_remote_code)
        except Exception as e:
            raise LlmqError(f"cannot load the tokenizer of {self.name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint's config declares (float32 when it declares none)."""
        d = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if isinstance(d, torch.dtype):
            return d
        return FLOAT_DTYPES.get(d, torch.float32) if isinstance(d, str) else torch.float32

    def read(self, module: nn.Module, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors of ``module``'s (at ``prefix``) parameters not yet loaded, read from disk; floating
        ones in ``dtype``."""
        out = {}
        for name, param in list(module.named_parameters(recurse=True)):
            if param.device.type != "meta":
                continue
            full = f"{prefix}.{name}" if prefix else name
            if full in self.tied:
                continue  # stored under its target's name; tie_weights() shares that tensor
            t = self.load_like(full, param)
            out[name] = t.to(dtype) if t.is_floating_point() else t
        return out

    def materialize(self, model: nn.Module, prefix: str, dtype: torch.dtype,
                    tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Put the parameters of the sub-module at ``prefix`` in memory: ``tensors`` read ahead (llmq.prefetch),
        else read from disk now."""
        module = model.get_submodule(prefix) if prefix else model
        for name, t in (self.read(module, prefix, dtype) if tensors is None else tensors).items():
            _set_param(module, name, t)
        return module



def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read(header: Header, path: Path, key: str) -> torch.Tensor:
    """Tensor ``key`` at its header's offsets (_keys has checked the header and the file's extent with
    safe_open), or through safe_open where its dtype is one the header reader does not know."""
    if header.dtype_known(key):
        return header.read(path, key)
    with safe_open(str(path), framework="pt") as st:
        return st.get_tensor(key)


def _keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, its header checked: every entry's dtype, shape and extent."""
    try:
        with safe_open(str(path), framework="pt") as st:
            keys = list(st.keys())
            for k in keys:
                st.get_slice(k).get_shape()
            return keys
    except Exception as e:  # truncated, or a corrupted header (length, JSON, dtype, offsets)
        raise LlmqError(f"{str(path)!r} is not a readable safetensors file: {_first_line(e)}") from None


def _linears_for_conv1d(model: nn.Module) -> set[str]:
    """Replace GPT-2's Conv1D (y = x W + b with W stored in x out) by the equivalent nn.Linear.

    Every method and format then handles one kind of linear; load_tensor transposes these weights
    as they are read and ``stored`` transposes them back for the float tensors written out (packed
    ones use the GPTQ layout, which is the same for both: AutoGPTQ and its successors transpose
    Conv1D weights before quantizing).  Returns the names of the weights concerned.
    """
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            n_in, n_out = mod.weight.shape
            linear = nn.Linear(n_in, n_out, bias=mod.bias is not None, device="meta", dtype=mod.weight.dtype)
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, linear)
            names.add(f"{name}.weight")
    return names


def _checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Model name -> checkpoint key, through transformers' own renaming rules (e.g. GPT-NeoX's
    ``embed_out`` is ``lm_head`` in the module tree).  A key that transformers would merge into
    another tensor (per-expert weights into fused experts) maps by its renamings alone where the
    model holds it unmerged (llmq.experts); others are left out: asking for them fails clearly later."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # other transformers versions: names are used as they are
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = dict.fromkeys(model.state_dict(), True)
    mapping = {}
    for key in keys:
        new, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted is None:
            mapping[new] = key
        else:
            renamed, _ = rename_source_key(key, renamings, [], model.base_model_prefix, meta)
            if renamed in meta:
                mapping[renamed] = key
    return mapping


def _set_param(root: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def release(module: nn.Module) -> None:
    """Drop a module's parameters back to the meta device, freeing their memory."""
    for name, param in list(module.named_parameters(recurse=True)):
        if param.device.type != "meta":
            _set_param(module, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))


def is_resident(module: nn.Module) -> bool:
    return any(p.device.type != "meta" for p in module.parameters())


def move_resident(module: nn.Module, device: torch.device) -> None:
    """Module.to() that leaves meta (not yet loaded) tensors alone."""
    if device.type == "cpu":
        return
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None and t.device.type != "meta" and t.device != device:
                    moved = t.to(device, non_blocking=t.is_pinned())  # (pinned: read ahead, llmq.prefetch)
                    store[k] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
