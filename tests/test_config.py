from typing import get_args
from pathlib import Path

import pytest
import yaml

from finetune.core.config import (
    CUDA_OPTIMIZERS,
    ConfigError,
    FinetuneConfig,
    LossOn,
    Optimizer,
    Scheduler,
    load_config,
)
from finetune.core.errors import PermanentError
from finetune.core.preflight import check_hardware, hardware_problems
from tests.conftest import ROOT


def test_default_config_is_the_seed_recipe():
    config = load_config(ROOT / "configs" / "default.yaml")
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.05)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (config.train.batch_size, config.train.grad_accum, config.train.epochs) == (1, 4, 3)
    assert (config.train.learning_rate, config.train.max_grad_norm, config.train.warmup_ratio) == (2e-4, 0.3, 0.03)
    assert config.quant.quant_type == "nf4" and config.quant.double_quant
    assert config.tokenize.loss_on == LossOn.response


def test_llama2_config_names_the_hub_model():
    config = load_config(ROOT / "configs" / "llama2-7b-chat.yaml")
    assert config.model.base == "meta-llama/Llama-2-7b-chat-hf"
    assert config.train.optim == "paged_adamw_32bit"


def test_dotted_overrides_are_parsed_as_yaml():
    config = load_config(None, ["lora.r=16", "train.learning_rate=1e-4", "tokenize.loss_on=full", "data.topics=[a, b]"])
    assert config.lora.r == 16
    assert config.train.learning_rate == 1e-4
    assert config.tokenize.loss_on == LossOn.full
    assert config.data.topics == ["a", "b"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rank=4"], "lora.rank: unknown key"),
        (["train.learning_rate=-1"], "train.learning_rate: Input should be greater than 0"),
        (["train.epochs=many"], "train.epochs: Input should be a valid number"),
        (["tokenize.loss_on=prompt"], "tokenize.loss_on: Input should be 'response' or 'full'"),
        (["tokenize.template=no placeholder"], "tokenize.template: Value error, must contain the placeholder"),
        (["lora"], "expected key=value"),
        (["lora=3", "lora.r=1"], "'lora' is a value, not a section"),
        (["lora.r.x=1"], "lora.r: Input should be a valid integer"),
        (["data.min_chars=5000"], "data.min_chars=5000 exceeds data.max_chars=4000"),
        (["train.lr_scheduler=constant"], "train.warmup_ratio=0.03 is ignored by train.lr_scheduler=constant"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, overrides)


def test_bad_config_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_config_error_is_permanent():
    assert issubclass(ConfigError, PermanentError) and issubclass(ConfigError, ValueError)


def test_default_yaml_matches_the_code_defaults():
    """Every key of configs/default.yaml is there with the code's default, so neither can drift."""
    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"))
    assert raw == FinetuneConfig().model_dump(mode="json")


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("train.optim", get_args(Optimizer)),
        ("train.lr_scheduler", get_args(Scheduler)),
        ("lora.bias", ("none", "all", "lora_only")),
        ("quant.quant_type", ("nf4", "fp4")),
        ("quant.compute_dtype", ("auto", "bfloat16", "float16", "float32")),
        ("merge.dtype", ("bfloat16", "float16", "float32")),
        ("tokenize.overlength", ("reject", "truncate")),
        ("tokenize.loss_on", ("response", "full")),
    ],
)
def test_a_typo_in_a_choice_names_the_key_and_the_allowed_values(tmp_path, key, allowed):
    path = tmp_path / "typo.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as caught:
        load_config(path, [f"{key}=typo"])
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: Input should be ")
    assert all(f"'{value}'" in message for value in allowed)


def test_every_optimizer_and_scheduler_is_a_transformers_name():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(get_args(Optimizer)) <= {o.value for o in OptimizerNames}
    assert set(get_args(Scheduler)) <= {s.value for s in SchedulerType}
    for name in get_args(Optimizer):
        assert load_config(None, [f"train.optim={name}"]).train.optim == name
    for name in get_args(Scheduler):
        assert load_config(None, [f"train.lr_scheduler={name}", "train.warmup_ratio=0"]).train.lr_scheduler == name


def test_cuda_optimizers_are_the_paged_and_8bit_bitsandbytes_ones():
    assert CUDA_OPTIMIZERS == {name for name in get_args(Optimizer) if "paged" in name or "8bit" in name}
    trainer_optimizer = pytest.importorskip("transformers.trainer_optimizer")
    bitsandbytes = {str(getattr(o, "value", o)) for o in getattr(trainer_optimizer, "_BITSANDBYTES_OPTIMIZERS", ())}
    if bitsandbytes:  # a private name of transformers 5; only checked where it exists
        assert CUDA_OPTIMIZERS <= bitsandbytes


def test_paged_optimizer_needs_cuda():
    config = load_config(ROOT / "configs" / "llama2-7b-chat.yaml")
    assert hardware_problems(config, cuda=False, bf16=False) == [
        "train.optim=paged_adamw_32bit needs a CUDA GPU (its paging or 8-bit state saves GPU memory, "
        "a CPU gets only the slowdown); use adamw_torch on this machine"
    ]
    assert hardware_problems(config, cuda=True, bf16=True) == []
    assert hardware_problems(load_config(None, ["train.optim=adamw_8bit"]), cuda=False, bf16=False)
    assert hardware_problems(load_config(None, ["train.optim=lion_32bit"]), cuda=False, bf16=False) == []


def test_bf16_on_a_gpu_without_bf16_names_both_keys():
    config = load_config(None, ["quant.compute_dtype=bfloat16"])  # merge.dtype defaults to bfloat16
    problems = hardware_problems(config, cuda=True, bf16=False)
    assert [p.split("=")[0] for p in problems] == ["quant.compute_dtype", "merge.dtype"]
    assert "use float16" in problems[0] and "use float16" in problems[1]
    assert hardware_problems(config, cuda=True, bf16=True) == []
    assert hardware_problems(config, cuda=False, bf16=False) == []  # CPUs compute in bf16
    fixed = load_config(None, ["quant.compute_dtype=float16", "merge.dtype=float16"])
    assert hardware_problems(fixed, cuda=True, bf16=False) == []


def test_default_config_fits_a_cpu_machine():
    assert hardware_problems(FinetuneConfig(), cuda=False, bf16=False) == []


def test_check_hardware_raises_every_problem(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    config = load_config(None, ["train.optim=paged_adamw_8bit", "quant.compute_dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"^quant\.compute_dtype=bfloat16 .*\nmerge\.dtype=bfloat16 "):
        check_hardware(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train\.optim=paged_adamw_8bit needs a CUDA GPU"):
        check_hardware(config)


def test_triton_kernels_on_a_gpu_need_triton_and_a_c_compiler_before_any_stage(monkeypatch):
    """train.compiled_layers and train.fused_kernels run Triton kernels on a CUDA GPU: without Triton, or without
    the C compiler it builds their launchers with, the run stops before any stage, naming the key."""
    import torch

    from finetune.core.preflight import c_compiler, compiler_problems

    both = load_config(None, ["train.compiled_layers=true", "train.fused_kernels=true"])
    assert compiler_problems(both, cuda=True, triton=True, compiler="/usr/bin/gcc") == []
    assert compiler_problems(both, cuda=False, triton=False, compiler=None) == []  # ignored on the CPU
    assert compiler_problems(FinetuneConfig(), cuda=True, triton=False, compiler=None) == []  # both off by default
    no_triton = compiler_problems(both, cuda=True, triton=False, compiler="/usr/bin/gcc")
    assert [p.split(" ")[0] for p in no_triton] == ["train.compiled_layers", "train.fused_kernels"]
    assert all("needs Triton" in p for p in no_triton)
    (no_compiler,) = compiler_problems(load_config(None, ["train.compiled_layers=true"]), cuda=True, triton=True, compiler=None)
    assert no_compiler.startswith("train.compiled_layers needs a C compiler") and "set train.compiled_layers: false" in no_compiler
    fused = load_config(None, ["train.fused_kernels=true"])
    assert compiler_problems(fused, cuda=True, triton=True, compiler="/usr/bin/gcc", liger=False) == [
        "train.fused_kernels is true but the liger-kernel package is not installed: pip install -e '.[fused]' "
        "(or liger-kernel), or set train.fused_kernels: false"
    ]

    monkeypatch.setenv("CC", "/opt/cross/bin/cc")
    assert c_compiler() == "/opt/cross/bin/cc"  # Triton takes $CC first
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert c_compiler() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(ConfigError, match=r"^train\.compiled_layers needs "):
        check_hardware(both)


def test_auto_computes_in_bf16_on_a_cpu_only_where_it_has_bf16_instructions():
    """quant.compute_dtype=auto on a CPU: bf16 where /proc/cpuinfo lists bf16 matrix instructions (x86's
    avx512_bf16 or amx_bf16, Arm's bf16), fp32 elsewhere: emulated bf16 is tens of times slower than fp32."""
    import torch

    from finetune.core.config import ComputeDtype
    from finetune.training.modeling import pick_compute_dtype

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine picks by its GPU")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    native = bool(set(cpuinfo.read_text().split()) & {"avx512_bf16", "amx_bf16", "bf16"})
    assert pick_compute_dtype(ComputeDtype.auto) == (torch.bfloat16 if native else torch.float32)
    assert pick_compute_dtype(ComputeDtype.bfloat16) == torch.bfloat16  # asked for, it is kept


def test_compiled_layers_auto_is_decided_for_the_machine_before_the_train_key(tmp_path):
    """train.compiled_layers: auto compiles the decoder layers where that pays and can run: the fast recipe without
    gradient checkpointing, on a CUDA GPU with Triton and a C compiler. It is decided when the train stage's inputs
    are made, so the key names what the run does: on this CPU, the key of an explicit false."""
    from finetune.core.preflight import compiles_layers
    from finetune.stages.train import TrainInputs, train_adapter

    default = load_config(ROOT / "configs" / "default.yaml").train
    assert default.compiled_layers == "auto" and default.activation_memory_budget == 0.9
    gpu = {"cuda": True, "triton": True, "compiler": "/usr/bin/gcc"}
    assert compiles_layers(default, **gpu) is True
    for missing in ({"cuda": False}, {"triton": False}, {"compiler": None}):
        assert compiles_layers(default, **gpu | missing) is False, missing
    for override in ("train.recipe=seed", "train.gradient_checkpointing=true"):
        assert compiles_layers(load_config(None, [override]).train, **gpu) is False, override
    explicit = load_config(None, ["train.compiled_layers=true", "train.gradient_checkpointing=true"]).train
    assert compiles_layers(explicit, cuda=False, triton=False, compiler=None) is True  # as set (preflight checks it)
    assert compiles_layers(load_config(None, ["train.compiled_layers=false"]).train, **gpu) is False

    for name in ("tokenized", "model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.bin").write_bytes(b"x")
    config = FinetuneConfig()

    def inputs(train):
        return TrainInputs(tokenized_dir=tmp_path / "tokenized", model_dir=tmp_path / "model", quant=config.quant, lora=config.lora, train=train)

    auto, off = inputs(default), inputs(load_config(None, ["train.compiled_layers=false"]).train)
    assert auto.train.compiled_layers is False  # this machine has no CUDA GPU
    assert train_adapter.key(auto) == train_adapter.key(off)
    assert train_adapter.key(inputs(load_config(None, ["train.compiled_layers=true"]).train)) != train_adapter.key(off)
