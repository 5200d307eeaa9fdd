"""Model loading and decoding shared by train, evaluate and merge: one place decides dtypes and the
4-bit recipe, so the three stages load the base the same way."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from finetune.core.config import ComputeDtype, QuantConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def placement() -> str:
    """Where this process puts the model: its own GPU when it is a rank of a multi-GPU training."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device_name()


def pick_compute_dtype(setting: ComputeDtype) -> torch.dtype:
    """`auto`: bf16 where the hardware has it, fp16 on GPUs without bf16 (T4, V100), else fp32.

    CPUs get bf16 too: on the reference 2-core CPU one epoch of the default data took 50 s in bf16
    against 78 s in fp32 (DESIGN.md).
    """
    if setting != ComputeDtype.auto:
        return DTYPES[setting.value]
    if torch.cuda.is_available():
        # including_emulation=False: T4 and V100 report bf16 as supported, emulated and slow.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16


def bnb_config(quant: QuantConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=pick_compute_dtype(quant.compute_dtype),
    )


def load_base(model_dir: Path, quant: QuantConfig):
    """The frozen base: NF4 4-bit when `quant.load_in_4bit`, else in the compute dtype."""
    from transformers import AutoModelForCausalLM

    dtype = pick_compute_dtype(quant.compute_dtype)
    kwargs = {"dtype": dtype}
    if quant.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quant)
        kwargs["device_map"] = {"": placement()}  # 4-bit weights are placed while loading
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not quant.load_in_4bit:
        model.to(placement())
    return model


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """New token ids per prompt, greedy, EOS included when produced; batched with left padding."""
    tokenizer.padding_side = "left"
    results: list[list[int]] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            if tokenizer.eos_token_id in row:  # everything after EOS is padding
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            results.append(row)
    return results
