"""On a CUDA GPU: the same QLoRA code path with bitsandbytes' CUDA kernels. Skipped on CPU."""

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_train_and_evaluate_on_gpu_use_4bit_cuda_layers(workspace, tiny_model_dir):
    import bitsandbytes as bnb

    from finetune.core.config import load_config
    from finetune.stages.evaluate import EvaluateInputs, evaluate_adapter
    from finetune.stages.quantize import QuantizeInputs, quantize_base
    from finetune.stages.train import train_adapter
    from finetune.training.modeling import load_base
    from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

    config = load_config(ROOT / "configs" / "tiny.yaml", [*workspace_overrides(workspace), "quant.compute_dtype=auto"])
    base = load_base(tiny_model_dir, config.quant)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.device.type == "cuda" for layer in layers)
    assert layers[0].weight.quant_state.dtype == torch.bfloat16 or not torch.cuda.is_bf16_supported()

    root = workspace / "out"
    saved = quantize_base(QuantizeInputs(model_dir=tiny_model_dir, quant=config.quant), root)  # as the flow does: once, on the GPU
    assert json.loads((saved / "manifest.json").read_text())["device"] == "cuda"
    ours, theirs = load_base(saved, config.quant).state_dict(), base.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours)
    prepared_dir, tokenized_dir = tokenized_data(config, tiny_model_dir, root)
    train_dir = train_adapter(train_inputs(config, tokenized_dir, saved), root)
    summary = json.loads((train_dir / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["peak_memory_kind"] == "cuda_max_allocated"
    assert summary["train_steps"] == 13
    assert summary["data_workers"] == 2  # the next micro-batches collated by worker processes (train.data_workers: auto)
    evaluation = evaluate_adapter(EvaluateInputs(
        train_dir=train_dir, model_dir=saved, prepared_dir=prepared_dir, tokenized_dir=tokenized_dir,
        quant=config.quant, tokenize=config.tokenize, eval=config.eval,
    ), root)  # fmt: skip
    assert json.loads((evaluation / "metrics.json").read_text())["tuned"]["loss"] > 0


def test_a_real_cuda_out_of_memory_halves_the_micro_batch(workspace, tiny_model_dir):
    """The allocator is capped at 0.25 GB so that micro-batches of 64 do not fit: each attempt that runs
    out of memory notes a halved micro-batch, and the next attempt (a Prefect retry in a run) fits."""
    from finetune.core.config import load_config
    from finetune.stages.train import TrainingOutOfMemory, train_adapter
    from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        *workspace_overrides(workspace), "train.batch_size=64", "train.grad_accum=1", "train.epochs=1",
        "train.recipe=seed", "train.gradient_checkpointing=false",  # micro-batches of 64 as given, not re-planned
    ])  # fmt: skip
    root = workspace / "out"
    _, tokenized_dir = tokenized_data(config, tiny_model_dir, root)
    torch.cuda.set_per_process_memory_fraction(0.25e9 / torch.cuda.get_device_properties(0).total_memory)
    try:
        failures = 0
        for _ in range(6):
            try:
                train_dir = train_adapter(train_inputs(config, tokenized_dir, tiny_model_dir), root)
                break
            except TrainingOutOfMemory:
                failures += 1
        else:
            pytest.fail("never fitted")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    summary = json.loads((train_dir / "summary.json").read_text())
    assert failures >= 1 and len(summary["micro_batch_adjustments"]) == failures
    batch, accum = summary["micro_batch"]
    assert batch < 64 and batch * accum == 64


def test_low_memory_mode_trains_in_fp16_as_on_a_gpu_without_bf16(workspace, tiny_model_dir):
    """fp16 compute forced (T4-class GPUs have no bf16) with the fast step and checkpointing on."""
    import math

    from finetune.core.config import load_config
    from finetune.stages.train import train_adapter
    from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        *workspace_overrides(workspace), "quant.compute_dtype=float16", "train.gradient_checkpointing=true", "merge.dtype=float16",
    ])  # fmt: skip
    root = workspace / "out"
    _, tokenized_dir = tokenized_data(config, tiny_model_dir, root)
    train_dir = train_adapter(train_inputs(config, tokenized_dir, tiny_model_dir), root)

    summary = json.loads((train_dir / "summary.json").read_text())
    assert summary["compute_dtype"] == "float16" and summary["micro_batch"] == [8, 1] and summary["train_steps"] == 13
    losses = [entry["loss"] for entry in json.loads((train_dir / "log_history.json").read_text())]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


def test_the_graphed_step_trains_what_the_eager_step_does(workspace, tiny_model_dir):
    """The fast step replayed from a CUDA graph (static padded rows, no attention mask) against the same
    step run eagerly as a packed row: dropout off and fp32 compute, so the losses of all 13 steps agree
    to float rounding; the graph must also have been used, not fallen back."""
    import gc

    from finetune.core.config import load_config
    from finetune.stages.train import train_adapter
    from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

    losses, layouts = {}, {}
    torch._C._cuda_clearCublasWorkspaces()  # cuBLAS keeps a workspace per stream it ran on (the graph's side stream too)
    before = torch.cuda.memory_allocated()
    for graphs in ("true", "false"):
        config = load_config(ROOT / "configs" / "tiny.yaml", [
            *workspace_overrides(workspace), "lora.dropout=0", "quant.compute_dtype=float32", f"train.cuda_graphs={graphs}",
        ])  # fmt: skip
        root = workspace / f"graphs-{graphs}"
        _, tokenized_dir = tokenized_data(config, tiny_model_dir, root)
        train_dir = train_adapter(train_inputs(config, tokenized_dir, tiny_model_dir), root)
        layouts[graphs] = json.loads((train_dir / "summary.json").read_text())["step_layout"]
        losses[graphs] = [entry["loss"] for entry in json.loads((train_dir / "log_history.json").read_text())]
        gc.collect()
        torch._C._cuda_clearCublasWorkspaces()
        assert torch.cuda.memory_allocated() - before < 2**20  # the graph's memory pool is given back

    assert layouts == {"true": "graphed", "false": "packed"}
    assert len(losses["true"]) == len(losses["false"]) == 13
    assert max(abs(a - b) for a, b in zip(losses["true"], losses["false"])) < 1e-3, losses


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_train_the_steps_of_one_gpu(workspace, tiny_model_dir):
    """train.num_gpus=2: two DDP ranks through accelerate launch, each half of every step; the same
    steps and, dropout off in fp32, the same losses as one GPU (quantizing while loading); the ranks load the
    base quantize_base saved, as in the flow."""
    from finetune.core.config import load_config
    from finetune.stages.quantize import QuantizeInputs, quantize_base
    from finetune.stages.train import train_adapter
    from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

    runs = {}
    for gpus in (1, 2):
        config = load_config(ROOT / "configs" / "tiny.yaml", [
            *workspace_overrides(workspace), "lora.dropout=0", "quant.compute_dtype=float32", f"train.num_gpus={gpus}",
        ])  # fmt: skip
        root = workspace / f"gpus-{gpus}"
        _, tokenized_dir = tokenized_data(config, tiny_model_dir, root)
        base = quantize_base(QuantizeInputs(model_dir=tiny_model_dir, quant=config.quant), root) if gpus == 2 else tiny_model_dir  # ranks: the saved base
        train_dir = train_adapter(train_inputs(config, tokenized_dir, base), root)
        runs[gpus] = (json.loads((train_dir / "summary.json").read_text()), json.loads((train_dir / "log_history.json").read_text()))

    assert runs[2][0]["ranks"] == 2 and runs[2][0]["micro_batch"] == [4, 1] and runs[1][0]["micro_batch"] == [8, 1]
    assert len(runs[1][1]) == len(runs[2][1]) == 13
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(runs[1][1], runs[2][1])) < 1e-3


def _long_tokenized(tokenized_dir, out, lengths, vocab_low=100, seed=0):
    """A tokenize-stage folder of random sequences of `lengths` tokens, the last half of each trained."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for length in lengths:
        ids = rng.integers(vocab_low, 40000, size=length).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "train.parquet")
    for name in ("eval.parquet", "format.json", "manifest.json"):
        if (tokenized_dir / name).exists():
            (out / name).write_bytes((tokenized_dir / name).read_bytes())
    return out


def _train_long(
    workspace, tiny_model_dir, setting: str, values: tuple[str, ...], seed: int, also: tuple[str, ...] = ()
) -> dict[str, tuple[dict, list[float]]]:
    """{value: (summary, losses)}: 13 steps of the tiny model on 104 long examples (130 to 512 tokens, drawn
    with `seed`), bf16 with dropout off, once per value of the train config key `setting` (with the overrides
    `also`; eager layers unless they say otherwise, so that each lever is compared alone)."""
    from finetune.core.config import load_config
    from finetune.stages.train import train_adapter
    from tests.conftest import ROOT, tokenized_data, train_inputs, workspace_overrides

    rng = __import__("random").Random(seed)
    lengths = [rng.randint(130, 512) for _ in range(104)]
    runs = {}
    for value in values:
        config = load_config(ROOT / "configs" / "tiny.yaml", [
            *workspace_overrides(workspace), "lora.dropout=0", "quant.compute_dtype=bfloat16", "train.compiled_layers=false",
            *also, f"{setting}={value}",
        ])  # fmt: skip
        root = workspace / f"{setting.rsplit('.', 1)[-1]}-{value}"
        _, tokenized_dir = tokenized_data(config, tiny_model_dir, root)
        long_dir = _long_tokenized(tokenized_dir, root / "long", lengths)
        train_dir = train_adapter(train_inputs(config, long_dir, tiny_model_dir), root)
        summary = json.loads((train_dir / "summary.json").read_text())
        runs[value] = (summary, [entry["loss"] for entry in json.loads((train_dir / "log_history.json").read_text())])
    return runs


def test_a_packed_row_through_the_varlen_kernel_computes_each_example_alone(tiny_model_dir, monkeypatch):
    """The forward of long examples packed in one row through the variable-length kernel against each example
    on its own through sdpa (bf16): the same logits to bf16 rounding. The same row with attention reaching
    across examples (the kernel's bidirectional window) differs by far more: the check can fail."""
    from transformers import AutoModelForCausalLM

    from finetune.training import varlen

    assert varlen.available(torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    torch.manual_seed(0)
    lengths = [480, 130, 512, 300]
    examples = [torch.randint(100, 40000, (n,), device="cuda") for n in lengths]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[None]).logits[0].float() for ids in examples])
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        packed_inputs = dict(
            input_ids=torch.cat(examples)[None], position_ids=torch.cat([torch.arange(n, device="cuda") for n in lengths])[None],
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths),
        )  # fmt: skip
        varlen.use_varlen_attention(model)
        packed = model(**packed_inputs).logits[0].float()
        # Attention both ways, what a wrong mask would do: the kernel's arguments as use_varlen_attention looked them up.
        monkeypatch.setitem(varlen._KERNEL, "causal", {"window_size": (-1, -1)})
        leaking = model(**packed_inputs).logits[0].float()

    scale = alone.abs().max().item()
    error, leak = (packed - alone).abs().max().item(), (leaking - alone).abs().max().item()
    print(f"max |logit| {scale:.3f}; packed vs alone {error:.2e}; bidirectional vs alone {leak:.2e}")
    assert error < 0.02 * scale and leak > 10 * error


def test_long_examples_packed_through_the_varlen_kernel_train_the_steps_of_the_padded_split(workspace, tiny_model_dir):
    """13 steps of 8 long examples (130 to 512 tokens): one packed row through the variable-length kernel
    against the padded split without it (one example per micro-batch, sdpa), both bf16 with dropout off.
    The same examples per step and the loss over the same tokens: the losses agree to bf16 rounding."""
    runs = _train_long(workspace, tiny_model_dir, "train.varlen_attention", ("true", "false"), seed=0)
    layouts = {kernel: summary["step_layout"] for kernel, (summary, _) in runs.items()}
    losses = {kernel: run_losses for kernel, (_, run_losses) in runs.items()}

    assert layouts == {"true": "varlen", "false": "padded"}
    assert len(losses["true"]) == len(losses["false"]) == 13
    difference = max(abs(a - b) for a, b in zip(losses["true"], losses["false"]))
    print(f"losses {losses['true'][0]:.4f} .. {losses['true'][-1]:.4f}; max difference {difference:.2e}")
    assert difference < 2e-2, losses


def test_fused_kernels_train_the_steps_of_the_unfused_step(workspace, tiny_model_dir):
    """train.fused_kernels (Liger's RMSNorm, RoPE and SwiGLU kernels) on 13 steps of long examples packed through
    the variable-length kernel, against the same steps unfused: bf16, dropout off, the losses agree to rounding,
    and the fused run's modules are Liger's."""
    pytest.importorskip("liger_kernel")
    runs = _train_long(workspace, tiny_model_dir, "train.fused_kernels", ("false", "true"), seed=1)
    summaries = {fused: summary for fused, (summary, _) in runs.items()}
    losses = {fused: run_losses for fused, (_, run_losses) in runs.items()}

    assert summaries["true"]["fused_modules"] >= 3 * 2 and summaries["false"]["fused_modules"] == 0  # 2 layers: MLP, 2 norms
    from transformers.models.llama import modeling_llama

    assert not modeling_llama.LlamaRMSNorm.__name__.startswith("Liger")  # the module is transformers' own again
    assert summaries["true"]["step_layout"] == summaries["false"]["step_layout"] == "varlen"
    assert len(losses["true"]) == len(losses["false"]) == 13
    difference = max(abs(a - b) for a, b in zip(losses["true"], losses["false"]))
    print(f"fused: losses {losses['true'][0]:.4f} .. {losses['true'][-1]:.4f}; max difference {difference:.2e}")
    assert difference < 2e-2, losses


def test_a_dequantized_base_trains_the_steps_of_the_4bit_base(workspace, tiny_model_dir):
    """train.dequantized_base: the frozen NF4 weights dequantized once into bf16 instead of at every forward and
    backward. 13 steps of long examples packed through the variable-length kernel, bf16, dropout off: every
    adapted and frozen linear layer is dequantized, and the losses are those of the 4-bit base."""
    runs = _train_long(workspace, tiny_model_dir, "train.dequantized_base", ("false", "true"), seed=1)
    summaries = {value: summary for value, (summary, _) in runs.items()}
    losses = {value: run_losses for value, (_, run_losses) in runs.items()}

    assert summaries["true"]["dequantized_layers"] == 2 * 7 and summaries["false"]["dequantized_layers"] == 0  # q,k,v,o,gate,up,down x 2
    assert summaries["true"]["step_layout"] == summaries["false"]["step_layout"] == "varlen"
    assert len(losses["true"]) == len(losses["false"]) == 13
    difference = max(abs(a - b) for a, b in zip(losses["true"], losses["false"]))
    print(f"dequantized: losses {losses['true'][0]:.4f} .. {losses['true'][-1]:.4f}; max difference {difference:.2e}")
    assert difference < 1e-3, losses


def test_compiled_layers_train_the_steps_of_the_eager_layers(workspace, tiny_model_dir):
    """train.compiled_layers: the decoder layers but the first compiled by torch.compile. 13 steps of long examples
    packed through the variable-length kernel, bf16, dropout off: the second layer compiled as one graph, the
    attention kernel inside it (no graph break), and the losses are those of the eager layers to rounding; so are
    they with the compiler told to keep 30% of the activations (train.activation_memory_budget=0.3: the rest
    recomputed in the backward). The default, auto, compiles them on this GPU where Triton and a C compiler are."""
    from importlib.util import find_spec

    from torch._dynamo.utils import counters

    from finetune.core.preflight import c_compiler

    counters.clear()
    runs = _train_long(workspace, tiny_model_dir, "train.compiled_layers", ("false", "true"), seed=1)
    breaks = dict(counters["graph_break"])
    runs |= _train_long(workspace, tiny_model_dir, "train.activation_memory_budget", ("0.3",), 1, ("train.compiled_layers=true",))
    summaries = {value: summary for value, (summary, _) in runs.items()}
    losses = {value: run_losses for value, (_, run_losses) in runs.items()}

    assert breaks == {}, breaks
    assert summaries["true"]["compiled_layers"] == summaries["0.3"]["compiled_layers"] == 1
    assert summaries["false"]["compiled_layers"] == 0
    assert summaries["true"]["step_layout"] == summaries["false"]["step_layout"] == "varlen"
    assert len(losses["true"]) == len(losses["false"]) == len(losses["0.3"]) == 13
    difference = max(abs(a - b) for a, b in zip(losses["true"], losses["false"]))
    recomputed = max(abs(a - b) for a, b in zip(losses["0.3"], losses["false"]))
    print(f"compiled: losses {losses['true'][0]:.4f} .. {losses['true'][-1]:.4f}; max difference {difference:.2e}, budget 0.3 {recomputed:.2e}")
    assert difference < 2e-2 and recomputed < 2e-2, losses

    (auto, auto_losses), = _train_long(workspace, tiny_model_dir, "train.compiled_layers", ("auto",), 1).values()
    assert auto["compiled_layers"] == (1 if find_spec("triton") and c_compiler() else 0)
    assert max(abs(a - b) for a, b in zip(auto_losses, losses["false"])) < 2e-2
