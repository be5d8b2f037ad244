"""Windows of text the unquantized model writes itself, for the end-to-end tuning (llmq.tune).

The tuning fits the quantized model to the unquantized one's next-token distributions on calibration windows.
Where the calibration text is far from what the model was trained on (C4 for a model of children's stories),
the fit carries poorly to the model's own text: what lowers the KL on C4 can raise it on stories.
Windows sampled from the unquantized model are its own distribution by construction (the data-free
distillation of LLM-QAT, Liu et al., 2023); added to the calibration windows, they keep the fit on text of the
kind the model writes (eval/results/sampled.md).

Each window begins with the model's BOS token (where it has none, with a calibration window's first token)
and every next token is drawn at temperature 1 from the full distribution, through a KV cache: no top-k, no
top-p, no repetition penalty, since the tuning matches that distribution.  An end-of-text token is drawn like
any other and the model writes on after it, as in packed pretraining windows.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import StaticCache

# Windows sampled at once are sized to keep their KV cache under this, or on a GPU under a quarter of its free
# memory where that is more (a 7B model's window of 2048 takes 0.5 GB in bf16: 4 at a time would take 32
# rounds of 2048 steps for 128 windows, each step reading every weight).
CACHE_BYTES = 2 * 2**30
GPU_FREE_SHARE = 4


def sampled_windows(model: nn.Module, n: int, seqlen: int, calib: torch.Tensor, seed: int, bf16: bool = False,
                    progress: bool = True) -> torch.Tensor:
    """``n`` windows of ``seqlen`` token ids (on the CPU) drawn from ``model``, deterministic for a seed on a
    given device.  ``calib``: the calibration windows, whose first tokens start the windows of a model
    without BOS.  ``bf16``: the model's products in bf16 autocast (as the tuning's teacher runs)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    starts = start_tokens(model, calib, n)
    batch = windows_at_once(model, seqlen, cache_budget(device), 2 if bf16 else 4)
    bar = tqdm(total=n * (seqlen - 1), desc="sampling windows from the unquantized model", unit="tok",
               unit_scale=True, disable=not progress)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), bar:
        return torch.cat([_sample(model, first.to(device), seqlen, gen, bar) for first in starts.split(batch)])


def start_tokens(model: nn.Module, calib: torch.Tensor, n: int) -> torch.Tensor:
    """Each window's first token: BOS where the model's config names one, else calibration windows' first."""
    bos = getattr(model.config, "bos_token_id", None)
    if isinstance(bos, int):
        return torch.full((n,), bos, dtype=torch.long)
    return calib[:, 0].repeat((n + len(calib) - 1) // len(calib))[:n]


def cache_budget(device: torch.device) -> int:
    """The bytes the sampled windows' KV cache may take on ``device``."""
    if device.type != "cuda":
        return CACHE_BYTES
    return max(CACHE_BYTES, torch.cuda.mem_get_info(device)[0] // GPU_FREE_SHARE)


def windows_at_once(model: nn.Module, seqlen: int, budget: int, itemsize: int) -> int:
    """How many windows are sampled together: their KV cache (keys and values of ``itemsize`` bytes) within
    ``budget`` bytes; at least one."""
    c = model.config  # (head_dim and num_key_value_heads are optional: absent, they follow the heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_window = 2 * c.num_hidden_layers * kv_heads * head_dim * seqlen * itemsize
    return max(1, budget // per_window)


def _sample(model: nn.Module, first: torch.Tensor, seqlen: int, gen: torch.Generator, bar: tqdm) -> torch.Tensor:
    """Windows starting with tokens ``first``, each next token drawn from the model given the ones before."""
    ids = torch.empty(len(first), seqlen, dtype=torch.long, device=first.device)
    ids[:, 0] = first
    name, cache = _cache_argument(model), _static_cache(model, seqlen)
    for i in range(1, seqlen):
        out = model(input_ids=ids[:, i - 1 : i], use_cache=True, **{name: cache})
        cache = getattr(out, name)  # (the same object where static)
        probs = out.logits[:, -1].float().softmax(-1)
        ids[:, i] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        bar.update(len(first))
    return ids.cpu()


def _static_cache(model: nn.Module, seqlen: int) -> StaticCache | None:
    """A cache allocated once for the whole window (a growing one copies itself every token: twice the time
    here); None where this transformers' StaticCache takes other arguments (then the model grows its own)."""
    try:
        return StaticCache(config=model.config, max_cache_len=seqlen)
    except (TypeError, ValueError):
        return None


def _cache_argument(model: nn.Module) -> str:
    """The name of the KV cache, the forward's argument and its output's: ``cache`` from transformers 5.2x,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
