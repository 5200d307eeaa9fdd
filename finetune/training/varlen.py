"""Attention over packed rows with no mask: each example of a row attends to itself only, through torch's
variable-length attention kernel (`torch.nn.attention.varlen.varlen_attn`, FlashAttention-2 on CUDA).

A packed row holds a step's examples end to end. With `sdpa`, transformers confines attention to each
example through a dense block-diagonal mask over the whole row: memory grows with the square of the row
(65 GiB measured for four 2,048-token examples on a 7B model). The variable-length kernel takes the
examples' boundaries instead (`cu_seq_lens_q/k`, `max_length_q/k`, which TRL's padding-free collator
computes on the CPU for every micro-batch) and its memory grows with the tokens.

The function is registered with transformers' `AttentionInterface` under ATTENTION, with a mask function
that builds no mask; a model trains with it after `use_varlen_attention(model)`. CUDA only, in bf16 or
fp16 (the kernel's types); `available()` says whether this machine has it.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from finetune.core.errors import InternalError

ATTENTION = "finetune_varlen"


def _kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch before 2.10
        return None
    return varlen_attn


def available(compute_dtype: torch.dtype) -> bool:
    """Whether packed rows can use the variable-length kernel here: CUDA, torch 2.10+, a half type, and a GPU
    that FlashAttention-2 runs on (compute capability 8.0 or later)."""
    return (
        _kernel() is not None
        and torch.cuda.is_available()
        and compute_dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability()[0] >= 8
    )


def _causal(kernel) -> dict:
    """The kernel's argument for causal attention: `window_size=(-1, 0)` (torch 2.11 and later: the default
    window, (-1, -1), attends both ways), `is_causal=True` where an earlier signature had that."""
    parameters = inspect.signature(kernel).parameters
    if "window_size" in parameters:
        return {"window_size": (-1, 0)}
    if "is_causal" in parameters:
        return {"is_causal": True}
    raise InternalError(f"torch {torch.__version__}: varlen_attn takes neither window_size nor is_causal; update finetune/training/varlen.py")


def varlen_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention call for one packed row: query [1, heads, tokens, dim], key and value
    [1, kv heads, tokens, dim]; returns ([1, tokens, heads, dim], None). Traceable by torch.compile (the kernel is
    a custom op, and the row's boundaries are its inputs), so compiled layers hold it in their graph."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1:
        raise InternalError(
            f"{ATTENTION} attention needs one packed row and its boundaries (cu_seq_lens_q), from a padding-free "
            f"collator; got a batch of {query.shape[0]} rows and cu_seq_lens_q={cu_seq_lens!r}"
        )
    if dropout:
        raise InternalError(f"{ATTENTION} attention has no dropout; the model asks for {dropout}")
    kernel, causal, gqa = _KERNEL["call"], _KERNEL["causal"], _KERNEL["gqa"]
    dtype = _half(query.dtype)
    q, k, v = (t.squeeze(0).transpose(0, 1).to(dtype) for t in (query, key, value))  # [tokens, heads, dim]
    extra = dict(causal)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: fewer key/value heads
        if gqa:
            extra["enable_gqa"] = True
        else:
            repeats = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    device = q.device
    cu_q = cu_seq_lens.to(device=device, dtype=torch.int32, non_blocking=True)
    cu_k = kwargs.get("cu_seq_lens_k", cu_seq_lens).to(device=device, dtype=torch.int32, non_blocking=True)
    max_q = kwargs.get("max_length_q") or int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    max_k = kwargs.get("max_length_k") or max_q
    out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, scale=scaling, **extra)
    return out.unsqueeze(0).to(query.dtype), None


# The kernel and how this torch's signature asks for causal attention and grouped-query heads: looked up once,
# in use_varlen_attention, since a compiled graph cannot trace inspect.signature.
_KERNEL: dict = {}


def _half(dtype: torch.dtype) -> torch.dtype:
    """The kernel's type for inputs of `dtype`. A 4-bit model prepared for training keeps its norms in fp32, so
    query, key and value can arrive in fp32 while matrix products run in bf16 under autocast: they go in as
    autocast's type (sdpa is cast the same way by autocast itself), bf16 outside autocast."""
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.bfloat16


def _no_mask(*args, **kwargs):
    return None  # the boundaries travel as cu_seq_lens instead


def use_varlen_attention(model) -> None:
    """Register the attention function (again is harmless) and switch `model` to it."""
    kernel = _kernel()
    if kernel is None:
        raise InternalError(f"torch {torch.__version__} has no variable-length attention kernel; check varlen.available() first")
    _KERNEL.update(call=kernel, causal=_causal(kernel), gqa="enable_gqa" in inspect.signature(kernel).parameters)
    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)
    model.set_attn_implementation(ATTENTION)
