"""What reruns when something changes: each kind of edit (data, config, code, a library version) changes
the keys of exactly the stages it should, and of nothing upstream. Keys only, computed as the flow
computes them, with each upstream output stood in by its manifest (all that a key reads of an output)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

import finetune.core.stage as stage_module
from finetune.core.config import load_config
from finetune.stages.evaluate import EvaluateInputs, ScoreInputs, evaluate_adapter, score_model
from finetune.stages.export import ExportInputs, export_gguf
from finetune.stages.merge import MergeInputs, merge_adapter
from finetune.stages.prepare import PrepareInputs, prepare_dataset
from finetune.stages.quantize import QuantizeInputs, quantize_base
from finetune.stages.resolve import ResolveInputs, resolve_model
from finetune.stages.tokenize import TokenizeInputs, tokenize_dataset
from finetune.stages.train import TrainInputs, train_adapter
from tests.conftest import ROOT, workspace_overrides

ALL = {"prepare", "resolve_model", "tokenize", "quantize_base", "train", "evaluate", "merge", "export", "score"}
AFTER_TRAIN = {"train", "evaluate", "merge", "export", "score"}
BASE = {"resolve_model", "quantize_base"}  # the model, untouched by data and tokenizing


def _stand_in(root: Path, stage: str, key: str) -> Path:
    folder = root / stage / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "key": key}))
    return folder


def stage_keys(workspace: Path, *overrides: str) -> dict[str, str]:
    """The key of every stage of a run with `overrides` (flows/finetune_flow.py builds the same inputs)."""
    config = load_config(ROOT / "configs" / "tiny.yaml", [*workspace_overrides(workspace), f"model.base={workspace / 'model'}", *overrides])
    paths, root, keys = config.paths, workspace / "stand-ins", {}

    def run(stage, inputs) -> Path:
        keys[stage.name] = stage.key(inputs)
        return _stand_in(root, stage.name, keys[stage.name])

    prepared = run(prepare_dataset, PrepareInputs(
        raw_dir=paths.raw_dir, heldout_path=paths.heldout_path, data=config.data, template=config.tokenize.template,
    ))  # fmt: skip
    model = run(resolve_model, ResolveInputs.of(config.model))
    tokenized = run(tokenize_dataset, TokenizeInputs(prepared_dir=prepared, model_dir=model, tokenize=config.tokenize))
    base = run(quantize_base, QuantizeInputs(model_dir=model, quant=config.quant))
    trained = run(train_adapter, TrainInputs(
        tokenized_dir=tokenized, model_dir=base, quant=config.quant, lora=config.lora, train=config.train,
    ))  # fmt: skip
    run(evaluate_adapter, EvaluateInputs(
        train_dir=trained, model_dir=base, prepared_dir=prepared, tokenized_dir=tokenized,
        quant=config.quant, tokenize=config.tokenize, eval=config.eval,
    ))  # fmt: skip
    merged = run(merge_adapter, MergeInputs(
        train_dir=trained, model_dir=model, prepared_dir=prepared, tokenize=config.tokenize, merge=config.merge,
    ))  # fmt: skip
    run(export_gguf, ExportInputs(merged_dir=merged, prepared_dir=prepared, template=config.tokenize.template, export=config.export))
    run(score_model, ScoreInputs(model_dir=merged / "model", prepared_dir=prepared, tokenize=config.tokenize, eval=config.eval))
    return keys


def rerun(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {stage for stage in before if before[stage] != after[stage]}


@pytest.fixture
def project(workspace) -> Path:
    """The project's data and a small local model folder (the resolve key reads its bytes only)."""
    (workspace / "model").mkdir()
    (workspace / "model" / "config.json").write_text('{"model_type": "llama"}')
    return workspace


@pytest.mark.parametrize(
    ("overrides", "reruns"),
    [
        (['tokenize.template="### Q:\\n{instruction}\\n\\n### A:\\n"'], ALL - BASE),  # prepare checks its markers
        (["data.max_chars=3000"], ALL - BASE),
        (["tokenize.max_length=256"], ALL - BASE - {"prepare"}),
        (["lora.r=16"], AFTER_TRAIN),
        (["quant.double_quant=false"], AFTER_TRAIN | {"quantize_base"}),
        (["train.recipe=seed"], AFTER_TRAIN),  # the step shape and recomputation are the recipe's code, keyed by it
        (["train.gradient_checkpointing=true"], AFTER_TRAIN),
        (["eval.max_new_tokens=64"], {"evaluate", "score"}),
        (["merge.dtype=bfloat16"], {"merge", "export", "score"}),
        (["export.gguf=[q8_0]"], {"export"}),
        (["train.report_to=[tensorboard]", "train.num_gpus=2", "promote.min_loss_gain=0.5"], set()),  # where it reports, not what
    ],
)
def test_a_config_change_reruns_its_stage_and_what_follows(project, overrides, reruns):
    assert rerun(stage_keys(project), stage_keys(project, *overrides)) == reruns


def test_data_and_model_files_rerun_what_reads_them(project):
    before = stage_keys(project)
    with (project / "data/raw/education.jsonl").open("a") as handle:
        handle.write('{"instruction": "What is a syllabus?", "response": "The plan of a course.", "topic": "education"}\n')
    after_data = stage_keys(project)
    assert rerun(before, after_data) == ALL - BASE

    (project / "model" / "config.json").write_text('{"model_type": "llama", "rope_theta": 20000}')
    assert rerun(after_data, stage_keys(project)) == ALL - {"prepare"}

    shutil.copytree(project / "data", project / "moved-data")  # the same bytes elsewhere: the same keys
    moved = stage_keys(project, f"paths.raw_dir={project / 'moved-data/raw'}", f"paths.heldout_path={project / 'moved-data/eval/heldout.jsonl'}")
    assert rerun(stage_keys(project), moved) == set()


@pytest.mark.parametrize(
    ("module", "reruns"),
    [
        ("finetune/training/recipe.py", AFTER_TRAIN),
        ("finetune/data/template.py", ALL - BASE),
        ("finetune/stages/quantize.py", AFTER_TRAIN | {"quantize_base"}),
        ("finetune/training/merge_check.py", {"merge", "export", "score"}),
        ("finetune/reporting/stats.py", {"evaluate", "score"}),
        ("finetune/stages/resolve.py", ALL - {"prepare"}),
    ],
)
def test_a_code_change_reruns_the_stages_that_run_that_code(project, monkeypatch, module, reruns):
    before = stage_keys(project)
    original = stage_module.normalized_source

    def edited(path: Path) -> str:  # as if a statement were added to `module`
        return original(path) + ("\nCHANGED = True" if path.resolve() == (ROOT / module).resolve() else "")

    monkeypatch.setattr(stage_module, "normalized_source", edited)
    assert rerun(before, stage_keys(project)) == reruns


@pytest.mark.parametrize(
    ("library", "reruns"),
    [
        ("peft", AFTER_TRAIN),
        ("bitsandbytes", AFTER_TRAIN | {"quantize_base"}),  # reached through transformers' quantization config
        ("trl", AFTER_TRAIN),
        ("rouge-score", {"evaluate", "score"}),
        ("pandera", ALL - BASE),
        ("tokenizers", ALL - {"prepare"}),
        ("transformers", ALL - {"prepare"}),
        ("filelock", set()),  # plumbing: it moves no numbers
    ],
)
def test_a_library_upgrade_reruns_the_stages_it_computes(project, monkeypatch, library, reruns):
    before = stage_keys(project)
    original = stage_module.library_version
    monkeypatch.setattr(stage_module, "library_version", lambda name: "99.0" if name == library else original(name))
    assert rerun(before, stage_keys(project)) == reruns


def test_a_build_tag_is_not_a_version():
    """torch 2.13.0+cpu here and 2.13.0+cu128 on a GPU machine are the same code: the same keys."""
    assert "+" not in stage_module.library_version("torch")


def test_the_config_holds_values_and_their_checks_only():
    """Behaviour in the config module would sit outside every code digest (it is left out: its values are
    in the keys), so a change of it would serve stale outputs. Its classes hold fields and validators."""
    tree = ast.parse((ROOT / "finetune" / "core" / "config.py").read_text(encoding="utf-8"))
    behaviour = [
        f"{cls.name}.{node.name}"
        for cls in tree.body if isinstance(cls, ast.ClassDef)
        for node in cls.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if not {ast.unparse(d).split("(")[0] for d in node.decorator_list} & {"field_validator", "model_validator", "classmethod"}
        or "property" in {ast.unparse(d) for d in node.decorator_list}
    ]  # fmt: skip
    assert behaviour == [], "move these into the stage code that uses them"
