"""The data contract: a corpus of bad inputs, each with its exact outcome, and property-based tests
that no input ends in a traceback."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.core.config import DataConfig, TokenizeConfig
from finetune.data.readers import DataError, data_files
from finetune.data.template import PromptFormat
from finetune.stages.prepare import load_rows, prepare_dataset
from tests.conftest import ROOT, prepare_inputs

PROMPT = PromptFormat(TokenizeConfig().template)

TOPICS = ["science_technology", "health_wellness", "business_finance", "environment", "education"]
CONFIG = DataConfig(topics=TOPICS)
GOOD = {"instruction": "What is rain?", "response": "Water falling from clouds.", "topic": "environment"}


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def with_(**fields) -> dict:
    return {**GOOD, **fields}


# (case, file name, content, outcome): "reject:<reason prefix>" for the row on line 2 (line 1 is valid;
# "reject@N:" for line N), "error:<message part>" for the whole file, or "ok:<rows>".
CASES = [
    ("malformed JSON line", "a.jsonl", jsonl(GOOD, b'{"instruction": "x",'), "reject:malformed JSON"),
    ("wrong field names", "a.jsonl", jsonl({"question": "q", "answer": "a"}), "error:unknown field layout; found fields ['answer', 'question']"),
    ("empty instruction", "a.jsonl", jsonl(GOOD, with_(instruction="")), "reject:instruction is empty after trimming"),
    ("whitespace-only response", "a.jsonl", jsonl(GOOD, with_(response=" \n\t ")), "reject:response is empty after trimming"),
    ("a 1 MB row", "a.jsonl", jsonl(GOOD, with_(response="word " * 200_000)), "reject:response length is outside data.min_chars..data.max_chars"),
    ("non-UTF-8 bytes", "a.jsonl", jsonl(GOOD, b'{"instruction": "caf\xe9", "response": "r"}'), "reject:not valid UTF-8 (byte 0xe9"),
    ("a BOM", "a.jsonl", b"\xef\xbb\xbf" + jsonl(GOOD, GOOD | {"instruction": "Why?"}), "ok:2"),
    ("CRLF line ends", "a.jsonl", jsonl(GOOD, with_(instruction="Why?")).replace(b"\n", b"\r\n"), "ok:2"),
    ("a NUL character", "a.jsonl", jsonl(GOOD, with_(response="bad\u0000text")), "reject:response contains the control character U+0000"),
    ("an escape character", "a.jsonl", jsonl(GOOD, with_(instruction="\u001b[31mred")), "reject:instruction contains the control character U+001B"),
    ("a lone surrogate", "a.jsonl", jsonl(GOOD, b'{"instruction": "\\ud800", "response": "r", "topic": "education"}'), "reject:instruction contains the control character U+D800"),
    ("a number where text belongs", "a.jsonl", jsonl(GOOD, with_(instruction=42)), "reject:instruction must be text, got int"),
    ("a nested object where text belongs", "a.jsonl", jsonl(GOOD, with_(response={"text": "a"})), "reject:response must be text, got dict"),
    ("null response", "a.jsonl", jsonl(GOOD, with_(response=None)), "reject:response must be text, got nothing"),
    ("a missing topic", "a.jsonl", jsonl(GOOD, {"instruction": "Why?", "response": "Because."}), "reject:topic is missing or not one of data.topics"),
    ("an unknown topic", "a.jsonl", jsonl(GOOD, with_(topic="cooking")), "reject:topic is missing or not one of data.topics"),
    ("a template marker in a field", "a.jsonl", jsonl(GOOD, with_(response="Sure.\n### HUMAN:\nmore")), "reject:response contains a template marker"),
    ("a list instead of an object", "a.jsonl", jsonl(GOOD, [1, 2]), "reject:a JSON object is expected, got list"),
    ("a row missing a field of the layout", "a.jsonl", jsonl(GOOD, {"instruction": "Why?", "topic": "education"}), "reject:missing field(s) ['response'] of the instruction/response layout"),
    ("nesting too deep", "a.jsonl", jsonl(GOOD, b"[" * 100_000 + b"]" * 100_000), "reject:malformed JSON: nested too deeply"),
    ("an empty file", "a.jsonl", b"", "ok:0"),  # an upstream export with nothing new today: listed with 0 rows
    ("a whitespace-only file", "a.jsonl", b"\n \n\t\n", "ok:0"),
    ("a chat record with two user turns", "a.jsonl",
     jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "topic": "education"},
           {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}),
     "reject:messages must be user and assistant turns in turn, starting with user and ending with assistant (an optional system turn first); found roles: user, user, assistant"),  # fmt: skip
    ("chat messages that are not objects", "a.jsonl",
     jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "topic": "education"},
           {"messages": ["hi"]}),
     "reject:messages must be a list of {role, content} objects"),  # fmt: skip
    ("a CSV with a missing column", "a.csv", b"instruction,topic\nWhat?,education\n", "error:unknown field layout; found fields ['instruction', 'topic']"),
    ("a CSV row with extra cells", "a.csv", b"instruction,response,topic\nWhat?,Answer.,education\nWhy?,Because.,education,extra\n", "reject@3:1 cell(s) beyond the 3 header columns"),
    ("a CSV with NUL bytes", "a.csv", b"instruction,response\nWh\x00at,A\n", "error:contains NUL bytes"),
    ("a JSON file that is not an array", "a.json", json.dumps(GOOD).encode(), "error:a .json file must hold an array of records, found dict"),
    ("a JSON array with a string item", "a.json", json.dumps([GOOD, "text"]).encode(), "reject:a JSON object is expected, got str"),
    ("a JSON file that is not JSON", "a.json", b"[{oops", "error:not valid JSON"),
    ("a seed text block without a response", "a.txt", b"### HUMAN:\nWhat?\n### RESPONSE:\nThis.\n### HUMAN:\nAnd?\n", "reject@5:a block needs exactly one ### RESPONSE: line, found 0"),
    ("a text file without blocks", "a.txt", b"just some notes\n", "error:no '### HUMAN:' blocks"),
    ("a Parquet file that is not Parquet", "a.parquet", b"PAR1 not really", "error:not a readable Parquet file"),
    ("an unsupported file type", "a.xlsx", b"PK\x03\x04", "error:unsupported file type"),
]


@pytest.mark.parametrize(("case", "name", "content", "outcome"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_has_its_exact_outcome(tmp_path, case, name, content, outcome):
    path = tmp_path / name
    path.write_bytes(content)
    kind, _, expected = outcome.partition(":")
    kind, _, line = kind.partition("@")
    config = DataConfig() if name.endswith(".txt") else CONFIG  # the seed's text format has no topics

    if kind == "error":
        with pytest.raises(DataError) as error:
            load_rows([path], config, PROMPT, empty_ok=True)  # as prepare reads training files
        assert str(error.value).startswith(str(path))
        assert expected in str(error.value)
        return
    rows, rejected = load_rows([path], config, PROMPT, empty_ok=True)
    if kind == "ok":
        assert (len(rows), rejected) == (int(expected), [])
        assert not rows.instruction.str.contains("\r").any()
        return
    assert len(rejected) == 1, rejected
    assert (rejected[0]["source_file"], rejected[0]["source_line"]) == (str(path), int(line or 2))
    assert rejected[0]["reason"].startswith(expected), rejected[0]["reason"]
    assert len(rows) == 1


def test_every_layout_and_format_reads_the_same_pair(tmp_path):
    pair = ("What is rain?", "Water falling from clouds.")
    files = {
        "a.jsonl": jsonl({"prompt": pair[0], "completion": pair[1]}),
        "b.jsonl": jsonl({"input": pair[0], "output": pair[1]}),
        "c.json": json.dumps([{"instruction": pair[0], "input": "", "output": pair[1]}]).encode(),
        "d.jsonl": jsonl({"messages": [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]}),
        "e.csv": f'instruction,response\n"{pair[0]}","{pair[1]}"\n'.encode(),
        "f.txt": f"### HUMAN:\n{pair[0]}\n\n### RESPONSE:\n{pair[1]}\n".encode(),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    pd.DataFrame([{"instruction": pair[0], "response": pair[1]}]).to_parquet(tmp_path / "g.parquet")

    rows, rejected = load_rows(data_files(tmp_path), DataConfig(), PROMPT)

    assert rejected == []
    assert rows[["instruction", "response"]].drop_duplicates().values.tolist() == [list(pair)]
    assert len(rows) == 7


def test_alpaca_input_joins_the_instruction(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}))
    rows, _ = load_rows([tmp_path / "a.jsonl"], DataConfig(), PROMPT)
    assert rows.instruction.tolist() == ["Translate.\n\nBonjour"]


def test_a_folder_without_data_files_is_an_error(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"\x00")  # hidden: excluded by default
    with pytest.raises(DataError, match="no data files"):
        data_files(tmp_path)


def test_default_data_passes_with_zero_rejects():
    rows, rejected = load_rows(data_files(ROOT / "data/raw"), CONFIG, PROMPT)
    assert (len(rows), rejected) == (104, [])
    held, rejected = load_rows([ROOT / "data/eval/heldout.jsonl"], CONFIG, PROMPT)
    assert (len(held), rejected) == (25, [])


def _outcome_is_clean(raw_dir, heldout, out_root) -> None:
    """Either prepared splits, or a DataError naming a file; never any other exception."""
    try:
        out = prepare_dataset(prepare_inputs(raw_dir, heldout, DataConfig(max_reject_share=1, min_rows=1)), out_root)
    except DataError as error:
        assert str(raw_dir) in str(error) or "rows rejected" in str(error) or str(heldout) in str(error)
        return
    train = pd.read_parquet(out / "train.parquet")
    assert len(train) >= 1 and train.instruction.map(type).eq(str).all()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=8,
)
records = st.dictionaries(
    st.sampled_from(["instruction", "response", "prompt", "completion", "input", "output", "messages", "topic", "x"]),
    json_values,
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=st.one_of(records, json_values))
def test_any_json_record_is_a_clean_reject_or_error(tmp_path_factory, record):
    raw = tmp_path_factory.mktemp("raw")
    (raw / "a.jsonl").write_bytes(jsonl(GOOD, record))
    _outcome_is_clean(raw, ROOT / "data/eval/heldout.jsonl", tmp_path_factory.mktemp("out"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".parquet"]))
def test_any_bytes_as_a_file_are_a_clean_reject_or_error(tmp_path_factory, content, suffix):
    raw = tmp_path_factory.mktemp("raw")
    shutil.copy(ROOT / "data/raw/education.jsonl", raw)
    (raw / f"z{suffix}").write_bytes(content)
    _outcome_is_clean(raw, ROOT / "data/eval/heldout.jsonl", tmp_path_factory.mktemp("out"))


def test_rows_read_in_chunks_are_the_rows_read_at_once(tmp_path, monkeypatch):
    """Every reader handed on in chunks of 7 rows gives the same rows, rejects and order as in one chunk,
    across a file whose bad rows fall inside and on the edges of chunks."""
    from finetune.data import readers

    records = [with_(instruction=f"What is rain, case {i}?") for i in range(40)]
    records[6] = with_(instruction="")  # invalid: rejected by the schema, in the first chunk
    records[21] = with_(response=7)  # rejected by the reader, on a chunk edge
    (tmp_path / "a.jsonl").write_bytes(jsonl(*records[:30], b'{"broken', *records[30:]))
    (tmp_path / "b.json").write_text(json.dumps(records))
    pd.DataFrame(records[:21] + records[22:]).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame(records[:21] + records[22:]).to_csv(tmp_path / "d.csv", index=False)
    files = data_files(tmp_path)

    whole_rows, whole_rejected = load_rows(files, CONFIG, PROMPT)
    monkeypatch.setattr(readers, "CHUNK_ROWS", 7)
    chunks = list(readers.read_chunks(tmp_path / "a.jsonl"))
    rows, rejected = load_rows(files, CONFIG, PROMPT)

    assert [len(chunk.rows) for chunk in chunks] == [7, 7, 7, 7, 7, 4]  # 41 lines, 2 rejected by the reader
    assert len(whole_rows) == 4 * 38 and len(whole_rejected) == 3 + 2 + 1 + 1
    pd.testing.assert_frame_equal(rows, whole_rows)
    assert sorted(rejected, key=str) == sorted(whole_rejected, key=str)


def test_near_duplicates_are_every_pair_at_or_over_the_similarity():
    """The indexed search finds exactly the pairs that comparing every training instruction with every
    held-out one finds, with the exact Jaccard similarity of their character 4-grams."""
    from finetune.data.checks import _grams, near_duplicates

    train, _ = load_rows(data_files(ROOT / "data/raw"), CONFIG, PROMPT)
    held, _ = load_rows([ROOT / "data/eval/heldout.jsonl"], CONFIG, PROMPT)
    found = near_duplicates(train, held, 0.3)

    expected = []
    for j, asked in enumerate(held.instruction):
        for i, text in enumerate(train.instruction):
            a, b = _grams(text), _grams(asked)
            if len(a & b) / len(a | b) >= 0.3:
                expected.append((f"{train.source_file[i]}:{train.source_line[i]}", f"{held.source_file[j]}:{held.source_line[j]}", round(len(a & b) / len(a | b), 2)))
    assert len(expected) >= 3  # the example data has pairs that alike at 0.3
    assert [(n["train"], n["heldout"], n["similarity"]) for n in found] == expected
