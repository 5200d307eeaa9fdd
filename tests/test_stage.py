"""Stage keys see the code a stage runs, found from its imports, and nothing of comments or formatting."""

from __future__ import annotations

import importlib
import textwrap

import pytest

from finetune.core.stage import code_digest, stage_modules


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package `toystage` on sys.path: a stage module that imports a helper lazily, inside a function."""
    root = tmp_path / "toystage"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "config.py").write_text("LIMIT = 3\n")
    (root / "unused.py").write_text("VALUE = 1\n")
    (root / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    (root / "stage.py").write_text(
        textwrap.dedent('''\
            """A stage."""
            from toystage.config import LIMIT


            def run(x):
                from toystage import helper  # lazy, like the heavy imports of real stages

                return helper.double(x) + LIMIT
            ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return root


def test_the_modules_of_a_stage_are_found_from_its_imports(package):
    # `from toystage import helper` runs the package's __init__ too
    assert stage_modules("toystage.stage") == ["toystage", "toystage.config", "toystage.helper", "toystage.stage"]


def test_comments_docstrings_and_formatting_keep_the_key_and_code_changes_it(package):
    helper = package / "helper.py"
    before = code_digest("toystage.stage")

    helper.write_text('"""Doubles."""\n\n# a comment\ndef double( x ):  # why\n    """Twice x."""\n    return (2 * x)\n')
    assert code_digest("toystage.stage") == before

    helper.write_text("def double(x):\n    return 3 * x\n")
    assert code_digest("toystage.stage") != before

    helper.write_text("def double(x):\n    return 2 * x\n")
    assert code_digest("toystage.stage") == before
    (package / "unused.py").write_text("VALUE = 2\n")  # not imported by the stage: not in its key
    assert code_digest("toystage.stage") == before


def test_the_real_stages_depend_on_what_they_import_and_not_on_config():
    train = stage_modules("finetune.stages.train")
    assert {"finetune.stages.train", "finetune.training.recipe", "finetune.training.modeling", "finetune.training.checkpoints"} <= set(train)
    assert "finetune.core.config" not in train  # its values are in the key as config sections
    assert "finetune.data.template" in stage_modules("finetune.stages.prepare")
    assert "finetune.training.recipe" not in stage_modules("finetune.stages.prepare")
