"""Speed and memory of the train stage on a Llama-2-7B-shaped model, on a CUDA GPU.

    python benchmarks/train_7b_shape.py --work /tmp/bench [--tokenizer DIR] [--set train.epochs=1 ...]

No hub is needed: the model is built from Llama-2-7B's shape with random weights (speed and memory
do not depend on the values), saved once under --work, and loaded through the normal 4-bit path. The
tokenizer is the embedded SmolLM2 one (vocabulary 49,152 instead of Llama-2's 32,000: +0.15B embedding
parameters), so the real default data is tokenized and trained on. Prints one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip


def build_model(model_dir: Path, tokenizer_dir: Path | None) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (model_dir / "config.json").is_file():
        return
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        from finetune.resolve import builtin_gguf_path

        gguf = builtin_gguf_path("smollm2-135m-instruct")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LLAMA2_7B)  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import torch

    from finetune.config import ModelConfig, load_config
    from finetune.prepare import PrepareInputs, prepare_dataset
    from finetune.resolve import ResolveInputs, resolve_model
    from finetune.tokenization import TokenizeInputs, tokenize_dataset
    from finetune.train import TrainInputs, train_adapter

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "default.yaml", args.overrides)
    model_dir = args.work / "llama2-7b-shape"
    started = time.monotonic()
    build_model(model_dir, args.tokenizer)
    built = time.monotonic() - started
    model_dir = resolve_model(ResolveInputs.of(ModelConfig(base=str(model_dir))), args.work)  # hashed once, linked
    prepared_dir = prepare_dataset(PrepareInputs(
        raw_dir=root / "data/raw", heldout_path=root / "data/eval/heldout.jsonl", data=config.data,
        template=config.tokenize.template,
    ), args.work)  # fmt: skip
    tokenized_dir = tokenize_dataset(TokenizeInputs(prepared_dir=prepared_dir, model_dir=model_dir, tokenize=config.tokenize), args.work)
    train_dir = train_adapter(TrainInputs(
        tokenized_dir=tokenized_dir, model_dir=model_dir, quant=config.quant, lora=config.lora, train=config.train,
    ), args.work / "runs" / str(time.time_ns()))  # fmt: skip
    summary = json.loads((train_dir / "summary.json").read_text())
    summary.update(gpu=torch.cuda.get_device_name(0), model_build_seconds=round(built, 1), overrides=args.overrides)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
