"""Model loading and decoding shared by train, evaluate and merge: one place decides dtypes and the
4-bit recipe, so the three stages load the base the same way."""

from __future__ import annotations

import contextlib
import json
import os
import platform
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

    CPUs get bf16 where they multiply it natively (cpu_has_bf16): on the reference 2-core CPU of 2026-12-02, one
    epoch of the default data took 50 s in bf16 against 78 s in fp32 (DESIGN.md). Elsewhere fp32.
    """
    if setting != ComputeDtype.auto:
        return DTYPES[setting.value]
    if torch.cuda.is_available():
        # including_emulation=False: T4 and V100 report bf16 as supported, emulated and slow.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions: AVX512-BF16 or AMX on x86, the BF16 extension on 64-bit
    Arm (Linux). Without them torch's bf16 matmul is emulated: on a 2-core AMD EPYC with AVX2 only, 0.9 GFLOP/s
    against 124 in fp32, and a step of the default recipe took 55 s in bf16 against 4 to 5 s in fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes):
        return True
    if platform.machine() in ("aarch64", "arm64") and Path("/proc/cpuinfo").is_file():
        features = {word for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("Features") for word in line.split()}
        return "bf16" in features
    return False


def bnb_config(quant: QuantConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=pick_compute_dtype(quant.compute_dtype),
    )


def saved_in_4bit(model_dir: Path) -> bool:
    """Whether `model_dir` holds a model saved already quantized (stage quantize_base): its config carries
    the quantization config, and loading it reads the 4-bit weights as they are."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8"))


def load_base(model_dir: Path, quant: QuantConfig):
    """The frozen base: NF4 4-bit when `quant.load_in_4bit` (quantized while loading, or loaded as saved by
    quantize_base), else in the compute dtype."""
    from transformers import AutoModelForCausalLM

    dtype = pick_compute_dtype(quant.compute_dtype)
    kwargs = {"dtype": dtype}
    if quant.load_in_4bit:
        if not saved_in_4bit(model_dir):
            kwargs["quantization_config"] = bnb_config(quant)
        kwargs["device_map"] = {"": placement()}  # 4-bit weights are placed while loading
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not quant.load_in_4bit:
        model.to(placement())
    return model


class DequantizedLinear(torch.nn.Linear):
    """A frozen 4-bit linear layer dequantized once into its compute dtype: the forward bitsandbytes computes
    for a batch of rows (dequantize, then a dense matmul in the compute dtype, the output in the input's dtype),
    without dequantizing again at every forward and backward. A subclass of nn.Linear, so peft wraps it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def dequantize_frozen_base(model) -> int:
    """Replace every 4-bit linear layer of `model` by a DequantizedLinear holding its weights dequantized into
    the layer's compute dtype (train.dequantized_base: 16-bit memory for the frozen weights, for speed);
    returns how many were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = module.weight.quant_state
        dtype = module.compute_dtype or state.dtype
        dense = DequantizedLinear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        dense.weight = torch.nn.Parameter(bnb.functional.dequantize_4bit(module.weight.data, state).to(dtype), requires_grad=False)
        if module.bias is not None:
            dense.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
        replaced += 1
    return replaced


def compile_decoder_layers(model, activation_memory_budget: float = 1.0) -> int:
    """Compile the decoder layers of `model` in place (train.compiled_layers; nn.Module.compile, so the state dict
    and checkpoints keep their keys); returns how many. The layers are those the model names as not to be split
    (`_no_split_modules`: LlamaDecoderLayer and the like), all but the first: its input, the embeddings, needs no
    gradient, which would make it a second graph to compile for one layer's work. The others share one graph, shapes
    left to the compiler: it compiles for the first row's length, then once more with the lengths that changed
    dynamic (marking every dimension dynamic from the start made compiling slower: README, Training speed).
    `activation_memory_budget` (train.activation_memory_budget) is the compiler's, a process-wide setting read when
    the layers compile, at the first steps."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = activation_memory_budget
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in base.modules() if type(module).__name__ in names]
    for layer in layers[1:]:
        layer.compile()
    return len(layers[1:])


def compiled_layer_count(model) -> int:
    return sum(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())


def inference_attention():
    """The attention kernels of evaluation's forward passes. On CUDA, flash or memory-efficient attention and
    not cuDNN's, which builds a plan for every new shape: each decoding step has a new key length, and the
    first 96-token decode of 25 prompts on an H200 (7B shape) took 15.2 s against 6.7 s for the same decode
    again. A context manager; a no-op on CPUs."""
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


CPU_EVAL_BATCH = 32  # 32 against 8 halved evaluate on a 2-core CPU
GPU_EVAL_MEMORY_SHARE = 0.3  # of the GPU's memory, for one batch's cache and logits: the model and the rest fit beside
MAX_EVAL_BATCH = 512


def eval_batch_size(setting: int | str, model, longest_tokens: int) -> int:
    """`eval.batch_size`, with `auto` resolved: CPU_EVAL_BATCH on a CPU; on a GPU, as many sequences of
    `longest_tokens` as fit in GPU_EVAL_MEMORY_SHARE of its memory with their key/value cache (in the
    model's dtype) and fp32 logits, rounded down to a multiple of 8. Fixed per GPU model and data, so a
    rerun batches the same way."""
    if setting != "auto":
        return int(setting)
    if model.device.type != "cuda":
        return CPU_EVAL_BATCH
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    cache = 2 * config.num_hidden_layers * kv_heads * head_dim * 2  # bytes per token: keys and values, 16-bit
    per_sequence = longest_tokens * (cache + 6 * config.vocab_size)  # logits: the model's 16-bit and their fp32 copy
    memory = torch.cuda.get_device_properties(model.device).total_memory
    fits = int(GPU_EVAL_MEMORY_SHARE * memory // max(per_sequence, 1))
    return max(1, min(MAX_EVAL_BATCH, fits // 8 * 8 or fits))


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """New token ids per prompt, greedy, EOS included when produced; batched with left padding, prompts of
    similar length together (longest first: a batch that does not fit fails at once), answers in prompt order."""
    tokenizer.padding_side = "left"
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda n: -lengths[n])
    found: dict[int, list[int]] = {}
    model.eval()
    for start in range(0, len(prompts), batch_size):
        picked = order[start : start + batch_size]
        batch = tokenizer([prompts[n] for n in picked], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode(), inference_attention():
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for n, row in zip(picked, output[:, batch["input_ids"].shape[1] :].tolist()):
            if tokenizer.eos_token_id in row:  # everything after EOS is padding
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            found[n] = row
    return [found[n] for n in range(len(prompts))]
