"""Stage quantize_base: the base saved in 4-bit once, loaded as it is by train, evaluate and every rank.
What it saves must be exactly what quantizing while loading gives, or every stage after it would train
and evaluate another model than the config says."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import torch

from finetune.core.config import ComputeDtype, QuantConfig
from finetune.stages.quantize import QuantizeInputs, quantize_base
from finetune.training.modeling import load_base, pick_compute_dtype, saved_in_4bit


def test_the_saved_base_is_the_base_quantized_while_loading(tiny_model_dir, tmp_path):
    quant = QuantConfig()
    inputs = QuantizeInputs(model_dir=tiny_model_dir, quant=quant)
    out = quantize_base(inputs, tmp_path)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quant_type"] == "nf4" and manifest["compute_dtype"] == inputs.quant.compute_dtype.value
    assert saved_in_4bit(out) and not saved_in_4bit(tiny_model_dir)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["bnb_4bit_quant_type"] == "nf4" and saved["bnb_4bit_use_double_quant"] is True
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()

    loaded, quantized_now = load_base(out, quant), load_base(tiny_model_dir, quant)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules()) == 14  # 2 layers x (4 attention + 3 MLP)
    ours, theirs = loaded.state_dict(), quantized_now.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if not torch.equal(ours[name].cpu(), theirs[name].cpu())] == []
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]], device=loaded.device)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quantized_now(ids).logits)

    assert quantize_base(inputs, tmp_path) == out  # built once: a second call finds it complete


def test_the_key_names_the_compute_dtype_that_auto_resolves_to(tiny_model_dir):
    auto = QuantizeInputs(model_dir=tiny_model_dir, quant=QuantConfig())
    resolved = auto.quant.compute_dtype
    assert resolved != ComputeDtype.auto and pick_compute_dtype(resolved) == pick_compute_dtype(ComputeDtype.auto)
    same = QuantizeInputs(model_dir=tiny_model_dir, quant=QuantConfig(compute_dtype=resolved))
    assert quantize_base.key(auto) == quantize_base.key(same)
    other = ComputeDtype.bfloat16 if resolved != ComputeDtype.bfloat16 else ComputeDtype.float32
    assert quantize_base.key(QuantizeInputs(model_dir=tiny_model_dir, quant=QuantConfig(compute_dtype=other))) != quantize_base.key(auto)
    assert quantize_base.key(QuantizeInputs(model_dir=Path(tiny_model_dir), quant=QuantConfig(quant_type="fp4"))) != quantize_base.key(auto)
