"""Stage `train` on several GPUs of one machine: data-parallel (DDP) ranks started by `accelerate launch`.

The train stage calls `train_on_ranks` when `train.num_gpus` asks for more than one GPU. It writes the
stage's inputs to a spec file and runs `accelerate launch --num_processes N -m finetune.stages.train_rank <spec>`; each rank loads its own 4-bit base on its own GPU and runs the same train stage code
(finetune/stages/train.py), where the Trainer syncs the adapters' gradients and rank 0 writes the output.
The ranks split each optimizer step's examples between them, so the global batch and the number of
steps are the config's whatever N is; checkpoints, and so resuming, are the Trainer's as on one GPU.

The ranks talk to this process through lines on their standard output that start with EVENT and hold
one JSON object: rank 0's log lines and progress, each rank's pid when it starts, and a rank's error
(with whether it is permanent or out of memory). Everything else they print is logged at debug level
and kept, so that a rank that dies without a word (killed, say) is named with its exit code and last
lines. When this process stops early (an error, a cancelled flow run) it terminates the launcher's
whole process group; the launcher stops the other ranks when one fails, and every rank exits when its
launcher is gone, so no rank outlives a run.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from finetune.core.errors import PermanentError
from finetune.core.stage import Hooks

EVENT = "FINETUNE-EVENT "
TAIL_LINES = 40


class RankFailed(RuntimeError):
    """A rank of a multi-GPU training failed; the message names the rank and its error."""


class RankFailedPermanently(PermanentError, RankFailed):
    """A rank failed with an error that the same inputs would raise again: no retry."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the launcher gets SIGTERM when the process that started it dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch_command(spec: Path, processes: int) -> list[str]:
    # --multi_gpu is accelerate's torchrun launcher; without a GPU the ranks train on the CPU over gloo
    # (accelerate's --cpu would start one process, or go through MPI). Each rank runs finetune/stages/train_rank.py.
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "finetune.stages.train_rank", str(spec),
    ]  # fmt: skip


def write_spec(path: Path, inputs, key: str, out: Path) -> Path:
    spec = {
        "tokenized_dir": str(inputs.tokenized_dir),
        "model_dir": str(inputs.model_dir),
        "quant": inputs.quant.model_dump(mode="json"),
        "lora": inputs.lora.model_dump(mode="json"),
        "train": inputs.train.model_dump(mode="json"),
        "key": key,
        "out": str(out),
    }
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def _event(line: str) -> dict | None:
    """The event of a rank's output line, or None for any other line (one garbled by another rank too)."""
    if not line.startswith(EVENT):
        return None
    try:
        event = json.loads(line[len(EVENT) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "rank" in event else None


def _failure(errors: list[dict], tail: collections.deque, returncode: int) -> RankFailed:
    """The error to raise: the rank that the launcher saw fail first (its "Root Cause"), with its own error
    where it reported one; the others' errors (a peer gone from a collective) follow from it."""
    text = "".join(tail)
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text, re.S)
    by_rank = {error["rank"]: error for error in reversed(errors)}  # each rank's first error
    if root is None and errors:
        root_rank = errors[0]["rank"]
    elif root is not None:
        root_rank = int(root.group(1))
    else:
        return RankFailed(f"train: the launcher exited with {returncode}; last lines:\n{text[-1500:]}")
    if root_rank in by_rank:
        error = by_rank[root_rank]
        kind = RankFailedPermanently if error.get("permanent") else RankFailed
        return kind(f"train: rank {root_rank} failed: {error['error']}")
    code = int(root.group(2))
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return RankFailed(f"train: rank {root_rank} died ({how}) without an error of its own; last lines:\n{text[-1500:]}")


def train_on_ranks(inputs, key: str, out: Path, hooks: Hooks, processes: int, work_dir: Path) -> dict:
    """Run the train stage as `processes` DDP ranks; returns rank 0's result (out/summary.json written).

    Raises RankFailed (or RankFailedPermanently) naming the first rank that failed; a rank out of memory
    is a RankFailed too, which the stage's retry answers with the smaller micro-batch the rank noted."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = write_spec(work_dir / "ranks.json", inputs, key, out)
    command = launch_command(spec, processes)
    hooks.logger.info("train: %d ranks through accelerate launch", processes)
    errors: list[dict] = []
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True, preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        for line in launcher.stdout:
            event = _event(line)
            if event is None:
                tail.append(line)
                hooks.logger.debug("%s", line.rstrip())
                continue
            if "error" in event:
                errors.append(event)
                hooks.logger.error("rank %d: %s", event["rank"], event["error"])
            elif "pid" in event:
                hooks.logger.info("rank %d started (pid %d)", event["rank"], event["pid"])
            if "log" in event:
                hooks.logger.log(event.get("level", logging.INFO), "%s", event["log"])
            if "progress" in event:
                hooks.progress(event["progress"])
        returncode = launcher.wait()
    finally:
        _stop(launcher)
    if returncode != 0:
        oom = next((error for error in errors if error.get("out_of_memory")), None)
        if oom is not None:  # the rank noted the smaller micro-batch in work_dir; a retry uses it
            raise RankFailed(f"train: rank {oom['rank']} ran out of memory: {oom['error']}")
        raise _failure(errors, tail, returncode)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {"train_steps": summary["train_steps"], "final_train_loss": summary["final_train_loss"]}


def _stop(launcher: subprocess.Popen) -> None:
    """Terminate the launcher's process group if it still runs: SIGTERM, then SIGKILL after 10 s."""
    if launcher.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher.pid, signal.SIGTERM)
    try:
        launcher.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


# --- used inside a rank (finetune/stages/train_rank.py) -------------------------------------------------------


def emit(**event) -> None:
    sys.stdout.write(EVENT + json.dumps(event) + "\n")
    sys.stdout.flush()


class EventHandler(logging.Handler):
    """A rank's log records as events: rank 0's from INFO, the others' from WARNING."""

    def __init__(self, rank: int):
        super().__init__(logging.INFO if rank == 0 else logging.WARNING)
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        emit(rank=self.rank, level=record.levelno, log=message if self.rank == 0 else f"[rank {self.rank}] {message}")


def exit_with_launcher() -> None:
    """Exit if the launcher that started this rank goes away (it cannot stop a rank it no longer knows)."""
    launcher = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1)
            if os.getppid() != launcher:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()
