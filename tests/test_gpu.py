"""On a CUDA GPU: the same QLoRA code path with bitsandbytes' CUDA kernels. Skipped on CPU."""

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_train_and_evaluate_on_gpu_use_4bit_cuda_layers(workspace, tiny_model_dir):
    import bitsandbytes as bnb

    from finetune.config import load_config
    from finetune.evaluate import evaluate_adapter
    from finetune.modeling import load_base
    from finetune.prepare import prepare_dataset
    from finetune.tokenization import tokenize_dataset
    from finetune.train import train_adapter
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs" / "tiny.yaml", ["quant.compute_dtype=auto"])
    base = load_base(tiny_model_dir, config.quant)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.device.type == "cuda" for layer in layers)
    assert layers[0].weight.quant_state.dtype == torch.bfloat16 or not torch.cuda.is_bf16_supported()

    root = workspace / "out"
    prepared = prepare_dataset(workspace / "data/raw", workspace / "data/eval/heldout.jsonl", config.data, root)
    tokenized = tokenize_dataset(prepared, tiny_model_dir, config.tokenize, root)
    adapter = train_adapter(tokenized, tiny_model_dir, config.quant, config.lora, config.train, root)
    summary = json.loads((adapter / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["peak_memory_kind"] == "cuda_max_allocated"
    assert summary["train_steps"] == 13
    evaluation = evaluate_adapter(adapter, tiny_model_dir, prepared, tokenized, config.quant, config.tokenize, config.eval, root)
    assert json.loads((evaluation / "metrics.json").read_text())["tuned"]["loss"] > 0
