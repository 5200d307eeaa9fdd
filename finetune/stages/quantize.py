"""Stage `quantize_base`: the base model folder -> the same model with its linear layers in 4-bit, saved.

Quantizing reads the whole 16-bit base (13.5 GB for a 7B model) and rounds every linear weight to NF4 (or
FP4). Done once here, train and evaluate load the saved 4-bit form (3.9 GB for 7B) as it is, and so does
each rank of a multi-GPU training: no process quantizes the base again, and a scheduled retrain of an
unchanged base loads only the 4-bit file. The weights are the same that quantizing while loading gives
(bitsandbytes' rounding is deterministic; tests/test_quantize.py compares them).

The output is a transformers model folder whose config.json carries its quantization config, with the
base's tokenizer files beside it. The key is the base's, the quant section with its compute dtype resolved
on this machine (the dtype of the quantization constants and of the layers left unquantized: bf16 on a
GPU, fp32 on most CPUs), and the libraries that compute it (bitsandbytes, through transformers).
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.core.config import ComputeDtype, QuantConfig
from finetune.core.errors import InternalError
from finetune.core.stage import Hooks, Stage
from finetune.training.modeling import DTYPES, load_base, pick_compute_dtype, placement

# The model's own files, which save_pretrained writes for the 4-bit form; every other file of the base
# (the tokenizer's, the chat template) is copied beside them.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


@dataclass(frozen=True, kw_only=True)
class QuantizeInputs:
    model_dir: Path  # output of resolve_model
    quant: QuantConfig

    def __post_init__(self):
        # The key names the dtype: compute_dtype: auto is decided here, for this machine (as train's compiled_layers).
        resolved = pick_compute_dtype(self.quant.compute_dtype)
        name = next(name for name, dtype in DTYPES.items() if dtype == resolved)
        object.__setattr__(self, "quant", self.quant.model_copy(update={"compute_dtype": ComputeDtype(name)}))


def _quantize(inputs: QuantizeInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Load the base quantized (on this process's GPU, else the CPU), save it into `out` with the tokenizer."""
    import torch

    if not inputs.quant.load_in_4bit:
        raise InternalError("quantize_base runs only with quant.load_in_4bit; the flow passes the base on as it is")
    started = time.perf_counter()
    model = load_base(inputs.model_dir, inputs.quant)
    loaded = time.perf_counter()
    model.save_pretrained(out)
    for item in sorted(Path(inputs.model_dir).iterdir()):
        if item.is_file() and item.suffix != ".safetensors" and item.name not in MODEL_FILES and not item.name.startswith("."):
            shutil.copyfile(item, out / item.name)  # resolve's files may be links into a user's folder: copies
    saved = time.perf_counter()
    size = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    hooks.logger.info(
        "quantized the base to %s in %.1f s on %s, saved %.2f GB in %.1f s",
        inputs.quant.quant_type, loaded - started, placement(), size / 1e9, saved - loaded,
    )  # fmt: skip
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the flow's next stage loads its own copy on this GPU
    return {
        "quant_type": inputs.quant.quant_type,
        "compute_dtype": inputs.quant.compute_dtype.value,
        "device": placement(),
        "weights_bytes": size,
        "seconds": {"load_and_quantize": round(loaded - started, 2), "save": round(saved - loaded, 2)},
    }


quantize_base = Stage("quantize_base", QuantizeInputs, _quantize, __name__, reached_through=("bitsandbytes", "safetensors"))
