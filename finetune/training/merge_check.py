"""Is the merged model base + adapter? Checked where that is exact (weights) and where it is behaviour.

Weights: per adapted layer, the merged weight against W + s*B*A computed in fp32 from the files on disk
(the base's safetensors and the adapter's), with s = alpha / r (alpha / sqrt(r) with rsLoRA). A merge
in dtype d rounds twice, the update and then the sum, each by at most d's unit roundoff u per element
(bf16 2^-8, fp16 2^-11, fp32 2^-24), so ||merged - expected||_F <= u (||s*B*A||_F + ||W + s*B*A||_F).
A layer over SLACK times that bound is wrong, and the message says how: not merged, scaled, transposed.

Behaviour: the merged model's logits (in d) against base+adapter's in fp32, teacher-forced on the
held-out prompts and base+adapter's greedy answers. The bar is d's own noise on the same tokens: the
logit difference between base+adapter in d and in fp32, times BEHAVIOUR_SLACK (and at least FLOOR),
both as the mean over positions of the largest difference at each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.core.errors import PermanentError

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
SLACK = 2.0  # GPUs may reduce 16-bit matmuls in reduced precision (torch's allow_*_reduced_precision_reduction)
# The merged model rounds W + s*B*A once; base+adapter rounds W and carries s*B*A on a path of its own: two
# roundings of one fp32 function, whose distances from it differ by up to about 2x between adapters (0.99x
# on the default run, 2.04x on a tiny model's hard-trained adapter). A wrong merge moves logits by the
# adapter's whole effect, tens of times the noise. The weights check above is the exact one.
BEHAVIOUR_SLACK = 3.0
FLOOR = 1e-3  # logits; fp32 against fp32 differs only by the order of additions
PREFIX, A_SUFFIX, B_SUFFIX = "base_model.model.", ".lora_A.weight", ".lora_B.weight"


def _tensors(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a model or adapter folder (sharded or not)."""
    found = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            found.update(dict.fromkeys(handle.keys(), path))
    return found


def _load(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(files[name], framework="pt") as handle:
        return handle.get_tensor(name)


class UnsupportedAdapterError(PermanentError, ValueError):
    """An adapter whose layout the check does not read; retrained with this project's LoRA config, it has none."""


def iter_adapter_updates(adapter_dir: Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(module name as in the base model, its update s*B*A in fp32 on `device`), one layer at a time: a 7B
    model's updates held at once would take 8 GiB."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UnsupportedAdapterError(
            f"{adapter_dir}: per-layer ranks or alphas (rank_pattern, alpha_pattern) are not supported by the merge "
            "check; train the adapter with one lora.r and lora.alpha"
        )
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    files = _tensors(adapter_dir)
    for name in sorted(n for n in files if n.endswith(A_SUFFIX)):
        module = name.removeprefix(PREFIX).removesuffix(A_SUFFIX)
        lora_a = _load(files, name).to(device, torch.float32)
        lora_b = _load(files, name.removesuffix(A_SUFFIX) + B_SUFFIX).to(device, torch.float32)
        update = scale * (lora_b @ lora_a)
        yield module, (update.T if config.get("fan_in_fan_out") else update)


def adapter_updates(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Module name (as in the base model) -> its update s*B*A in fp32, from the adapter folder."""
    return dict(iter_adapter_updates(adapter_dir))


def _diagnose(merged: torch.Tensor, base: torch.Tensor, update: torch.Tensor) -> str:
    """How a wrong layer differs: its update is missing, scaled, transposed, or something else."""
    applied = merged - base
    size = update.norm()
    if applied.norm() < 0.1 * size:
        return "the update is missing (layer not merged)"
    if update.shape[0] == update.shape[1] and (applied - update.T).norm() < 0.1 * size:
        return "the update is transposed"
    factor = float((applied * update).sum() / (update * update).sum())
    if (applied - factor * update).norm() < 0.1 * size:
        return f"the update is scaled {factor:.3g}x (expected alpha/r once)"
    return f"differs from base + (alpha/r)*B*A by {float((applied - update).norm() / size):.3g} of the update's size"


def check_weights(merged_state: dict[str, torch.Tensor], model_dir: Path, adapter_dir: Path, dtype: str) -> dict:
    """Every adapted layer of `merged_state` against W + s*B*A in fp32, within the merge dtype's rounding;
    computed where the merged weights are (a GPU checks a 7B merge in about a second)."""
    base_files = _tensors(model_dir)
    unit = UNIT_ROUNDOFF[dtype]
    wrong, worst_ratio, largest_error, layers = [], 0.0, 0.0, 0
    device = next(iter(merged_state.values())).device if merged_state else torch.device("cpu")
    for module, update in iter_adapter_updates(adapter_dir, device):
        layers += 1
        key = f"{module}.weight"
        if key not in merged_state:
            wrong.append(f"{module}: missing from the merged model")
            continue
        base = _load(base_files, key).to(device, getattr(torch, dtype)).float()  # the base as the merge loaded it
        merged = merged_state[key].detach().to(device).float()
        expected = base + update
        error = (merged - expected).norm()
        bound = SLACK * unit * (update.norm() + expected.norm())
        worst_ratio = max(worst_ratio, float(error / bound))
        largest_error = max(largest_error, float((merged - expected).abs().max()))
        if error > bound:
            wrong.append(f"{module}: {_diagnose(merged, base, update)}")
    return {"layers": layers, "wrong_layers": wrong, "largest_weight_error": largest_error,
            "error_to_rounding_bound": round(worst_ratio, 4), "passed": not wrong and layers > 0}  # fmt: skip


def _per_position(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """The largest logit difference at each position, over all prompts: (positions,)."""
    return torch.cat([(x - y).abs().amax(-1) for x, y in zip(a, b)])


def check_behaviour(reference: list[torch.Tensor], merged: list[torch.Tensor], reference_fp32: list[torch.Tensor]) -> dict:
    """The merged model (in the merge dtype) against base+adapter in fp32, within BEHAVIOUR_SLACK times the
    distance of base+adapter in the merge dtype from the same fp32 logits: both are the fp32 model
    rounded to the dtype, in two orders, and a right merge strays no further than rounding does. The
    mean over positions is compared (a lone position near a rounding flip can reach 3x the other's
    largest; a wrong layer moves every position); the largest are reported."""
    noise, difference = _per_position(reference, reference_fp32), _per_position(merged, reference_fp32)
    bar = max(BEHAVIOUR_SLACK * float(noise.mean()), FLOOR)
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(reference, merged))
    return {
        "mean_logit_diff": round(float(difference.mean()), 5), "dtype_noise_mean": round(float(noise.mean()), 5),
        "bar": round(bar, 5), "max_logit_diff": round(float(difference.max()), 4), "dtype_noise_max": round(float(noise.max()), 4),
        "top1_agreement_with_unmerged": f"{agree}/{len(noise)}", "passed": float(difference.mean()) <= bar,
    }  # fmt: skip
