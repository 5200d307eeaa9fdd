"""One rank of a multi-GPU training: `accelerate launch ... -m finetune.stages.train_rank <spec>` (finetune/training/distributed.py).

It reads the train stage's inputs from the spec, runs the train stage's own code on this rank's GPU and
reports through event lines on its standard output: its pid first, rank 0's log and progress, and its
error if it fails (then it exits 1)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from finetune.core.config import LoraConfig, QuantConfig, TrainConfig
from finetune.core.errors import PermanentError
from finetune.core.stage import Hooks
from finetune.stages.train import TrainingOutOfMemory, TrainInputs, train_here
from finetune.training.distributed import EventHandler, emit, exit_with_launcher


def inputs_from_spec(spec: dict) -> TrainInputs:
    return TrainInputs(
        tokenized_dir=Path(spec["tokenized_dir"]),
        model_dir=Path(spec["model_dir"]),
        quant=QuantConfig.model_validate(spec["quant"]),
        lora=LoraConfig.model_validate(spec["lora"]),
        train=TrainConfig.model_validate(spec["train"]),
    )


def main(spec_path: Path) -> int:
    rank = int(os.environ.get("RANK", "0"))
    exit_with_launcher()
    emit(rank=rank, pid=os.getpid())
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    logger = logging.getLogger(f"finetune.rank{rank}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(EventHandler(rank))
    progress = (lambda share: emit(rank=rank, progress=share)) if rank == 0 else (lambda share: None)
    try:
        train_here(inputs_from_spec(spec), spec["key"], Path(spec["out"]), Hooks(logger=logger, progress=progress))
    except BaseException as error:  # noqa: BLE001 - every failure is reported, then the rank exits non-zero
        out_of_memory = isinstance(error, TrainingOutOfMemory) or type(error).__name__ == "OutOfMemoryError"
        emit(rank=rank, error=f"{type(error).__name__}: {error}", permanent=isinstance(error, PermanentError), out_of_memory=out_of_memory)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
