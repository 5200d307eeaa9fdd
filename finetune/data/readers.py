"""Reading instruction/response pairs from the formats people keep them in.

Formats, by file suffix: JSON Lines (.jsonl), JSON arrays (.json), CSV (.csv), Parquet (.parquet) and
the seed's text format (.txt: blocks of `### HUMAN:` then `### RESPONSE:`), each also gzip, bz2 or xz
compressed (data.jsonl.gz). Any other file in the data folder is an error unless data.exclude names it. Field layouts, decided
from a file's first record (or its header) and then required of every row:

| layout | fields |
|---|---|
| instruction/response | instruction, response |
| prompt/completion | prompt, completion |
| input/output | input, output |
| alpaca | instruction, input (may be empty), output |
| chat | messages: user and assistant turns in turn, any number of exchanges, an optional system turn first |

A row is its last exchange (instruction, response) and the exchanges before it (`history`: user,
assistant, user, assistant, ...; empty for the single-exchange layouts). A system turn's text opens the
first user turn, followed by a blank line, as the saved chat template renders it.

Every row keeps its file and line (the record's number for JSON arrays and Parquet). A row that
cannot be used becomes a reject with a reason; a file that cannot be read at all is a DataError.
"""

from __future__ import annotations

import bz2
import csv
import fnmatch
import gzip
import io
import json
import lzma
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.core.config import ConfigError, FinetuneConfig
from finetune.core.errors import PermanentError
from finetune.data.template import SYSTEM_SEPARATOR

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# Compressed forms of those, read like the plain file: data.jsonl.gz, pairs.csv.xz, ...
COMPRESSIONS = {".gz": ("gzip", gzip.decompress), ".bz2": ("bz2", bz2.decompress), ".xz": ("xz", lzma.decompress)}
READABLE = ", ".join(SUFFIXES) + " (also compressed: " + ", ".join(f"*{s}" for s in COMPRESSIONS) + ")"
# The seed's text format; a template with the same shape (a marker line before and after the
# instruction) reads .txt files with its own markers instead (template.PromptFormat.line_markers).
SEED_MARKERS = ("### HUMAN:", "### RESPONSE:")


class DataError(PermanentError, ValueError):
    """Training data that cannot be used; the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class Layout:
    name: str
    fields: tuple[str, ...]

    def matches(self, keys: set[str]) -> bool:
        return set(self.fields) <= keys


# Most specific first: an alpaca record also has the fields of input/output.
LAYOUTS = (
    Layout("chat", ("messages",)),
    Layout("alpaca", ("instruction", "input", "output")),
    Layout("instruction/response", ("instruction", "response")),
    Layout("prompt/completion", ("prompt", "completion")),
    Layout("input/output", ("input", "output")),
)
UNDERSTOOD = "; ".join(f"{layout.name} ({', '.join(layout.fields)})" for layout in LAYOUTS)


@dataclass
class ReadResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, path: Path, line: int, reason: str) -> None:
        self.rejects.append({"source_file": str(path), "source_line": line, "reason": reason})


def _layout_for(path: Path, keys: set[str]) -> Layout:
    for layout in LAYOUTS:
        if layout.matches(keys):
            return layout
    raise DataError(f"{path}: unknown field layout; found fields {sorted(keys)}; understood layouts: {UNDERSTOOD}")


def visible_text(text: str) -> str:
    """What a reader sees of `text`: NFC-normalized, without format characters (Unicode category Cf:
    zero-width spaces and joiners, word joiners, soft hyphens, direction marks, byte-order marks), trimmed."""
    return "".join(c for c in unicodedata.normalize("NFC", text) if unicodedata.category(c) != "Cf").strip()


def _text_problem(name: str, value: Any) -> str | None:
    if not isinstance(value, str):
        kind = "nothing" if value is None else type(value).__name__
        return f"{name} must be text, got {kind}"
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cs") and c not in "\n\t\r"), None)
    if bad is not None:
        return f"{name} contains the control character U+{ord(bad):04X}"
    return None


def chat_turns(messages: Any) -> tuple[list[str] | None, str | None]:
    """(texts of the turns: user, assistant, user, ..., assistant; None) or (None, reason) for a chat
    record's messages. A system turn may come first; its text opens the first user turn."""
    if hasattr(messages, "tolist"):  # a Parquet list cell
        messages = messages.tolist()
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None, "messages must be a list of {role, content} objects"
    system = messages[0].get("content") if messages and messages[0].get("role") == "system" else None
    turns = messages[1:] if system is not None else messages
    roles = [m.get("role") for m in turns]
    expected = ["user", "assistant"] * (len(roles) // 2)
    if not roles or roles != expected or len(roles) % 2:
        shown = ", ".join(str(r) for r in [m.get("role") for m in messages][:8]) + (", ..." if len(messages) > 8 else "")
        return None, (
            "messages must be user and assistant turns in turn, starting with user and ending with assistant "
            f"(an optional system turn first); found roles: {shown}"
        )
    texts = [m.get("content") for m in turns]
    for number, text in enumerate([system, *texts] if system is not None else texts):
        if problem := _text_problem(f"messages[{number}].content", text):
            return None, problem
    if system is not None and visible_text(system):
        texts[0] = system.strip() + SYSTEM_SEPARATOR + texts[0]
    return texts, None


def _to_pair(record: dict[str, Any], layout: Layout) -> tuple[dict[str, Any] | None, str | None]:
    """(row, None) or (None, reason) for one record of a known layout."""
    if not layout.matches(set(record)):
        return None, f"missing field(s) {sorted(set(layout.fields) - set(record))} of the {layout.name} layout"
    history: list[str] = []
    if layout.name == "chat":
        texts, reason = chat_turns(record["messages"])
        if texts is None:
            return None, reason
        *history, instruction, response = texts
    elif layout.name == "alpaca":
        extra = record["input"]
        if extra is not None and not isinstance(extra, str):
            return None, f"input must be text, got {type(extra).__name__}"
        instruction = record["instruction"]
        if isinstance(instruction, str) and extra and extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        response = record["output"]
    else:
        instruction, response = (record[name] for name in layout.fields)
    topic = record.get("topic")
    for name, value in (("instruction", instruction), ("response", response)):
        if problem := _text_problem(name, value):
            return None, problem
    if topic is not None and (problem := _text_problem("topic", topic)):
        return None, problem
    return {"instruction": instruction, "response": response, "history": history, "topic": topic}, None


def _add_records(path: Path, numbered: list[tuple[int, Any]], result: ReadResult) -> None:
    """Records (line, parsed value) of one file: the first object decides the layout."""
    layout = None
    for line, record in numbered:
        if not isinstance(record, dict):
            result.reject(path, line, f"a JSON object is expected, got {type(record).__name__}")
            continue
        if layout is None:
            layout = _layout_for(path, set(record))
        row, reason = _to_pair(record, layout)
        if row is None:
            result.reject(path, line, reason)
        else:
            result.rows.append({**row, "source_file": str(path), "source_line": line})


def _decode_lines(path: Path, data: bytes, result: ReadResult) -> list[tuple[int, str]]:
    """UTF-8 lines without BOM or CR; a line that is not UTF-8 is rejected on its own."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as error:
            result.reject(path, number, f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})")
            continue
        lines.append((number, text))
    return lines


def _read_jsonl(path: Path, data: bytes, result: ReadResult) -> None:
    numbered = []
    for number, text in _decode_lines(path, data, result):
        if not text.strip():
            continue
        try:
            numbered.append((number, json.loads(text)))
        except json.JSONDecodeError as error:
            result.reject(path, number, f"malformed JSON: {error.msg} at column {error.colno}")
        except RecursionError:
            result.reject(path, number, "malformed JSON: nested too deeply")
    _add_records(path, numbered, result)


def _read_json(path: Path, data: bytes, result: ReadResult) -> None:
    try:
        parsed = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 at byte {error.start}; save it as UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as error:
        where = f" line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) else ""
        raise DataError(f"{path}:{where}: not valid JSON; a .json file must hold one array of records") from None
    if not isinstance(parsed, list):
        raise DataError(f"{path}: a .json file must hold an array of records, found {type(parsed).__name__}")
    _add_records(path, list(enumerate(parsed, start=1)), result)


def _read_csv(path: Path, data: bytes, result: ReadResult) -> None:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 at byte {error.start}; save it as UTF-8") from None
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes; it is not a text CSV file")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = set(reader.fieldnames or [])
    layout = _layout_for(path, header)
    if layout.name == "chat":
        raise DataError(f"{path}: the chat layout needs JSON or JSONL, not CSV")
    try:
        for record in reader:
            line = reader.line_num
            if None in record:  # more cells than header columns
                result.reject(path, line, f"{len(record[None])} cell(s) beyond the {len(header)} header columns")
                continue
            if any(record.get(name) is None for name in layout.fields):
                result.reject(path, line, "fewer cells than header columns")
                continue
            row, reason = _to_pair(record, layout)
            if row is not None and row["topic"] == "":
                row["topic"] = None
            if row is None:
                result.reject(path, line, reason)
            else:
                result.rows.append({**row, "source_file": str(path), "source_line": line})
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def _read_parquet(path: Path, result: ReadResult, data: bytes) -> None:
    import pandas as pd

    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__})") from None
    _layout_for(path, set(frame.columns))
    records = [{k: (None if _is_missing(v) else v) for k, v in record.items()} for record in frame.to_dict("records")]
    _add_records(path, list(enumerate(records, start=1)), result)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: an empty Parquet cell


def _read_seed_text(path: Path, data: bytes, result: ReadResult, markers: tuple[str, str]) -> None:
    """Blocks of `### HUMAN:` then `### RESPONSE:` (or the template's own markers), as the seed's
    dataset was written."""
    human, answer = markers
    lines = _decode_lines(path, data, result)
    blocks: list[tuple[int, list[str]]] = []
    for number, text in lines:
        if text.strip() == human or text.startswith(human + " "):
            blocks.append((number, [text]))
        elif blocks:
            blocks[-1][1].append(text)
        elif text.strip():
            result.reject(path, number, f"text before the first {human} line")
    if not blocks:
        raise DataError(f"{path}: no '{human}' blocks; a .txt file holds {human} / {answer} pairs")
    for number, block in blocks:
        body = "\n".join(block)[len(human):]
        if body.count(answer) != 1:
            result.reject(path, number, f"a block needs exactly one {answer} line, found {body.count(answer)}")
            continue
        instruction, response = (part.strip() for part in body.split(answer))
        row, reason = _to_pair({"instruction": instruction, "response": response}, LAYOUTS[2])
        if row is None:
            result.reject(path, number, reason)
        else:
            result.rows.append({**row, "source_file": str(path), "source_line": number})


def format_of(path: Path) -> str | None:
    """The plain suffix a file is read as (`.jsonl` for data.jsonl.gz too), or None: no reader for it."""
    path = Path(path)
    suffix = Path(path.stem).suffix if path.suffix in COMPRESSIONS else path.suffix
    return suffix if suffix in SUFFIXES else None


def _file_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix not in COMPRESSIONS:
        return data
    name, decompress = COMPRESSIONS[path.suffix]
    try:
        return decompress(data)
    except Exception as error:  # gzip, bz2 and lzma each raise their own types for damaged data
        raise DataError(f"{path}: not a readable {name} file ({type(error).__name__}: {error})") from None


def read_pairs(path: Path, markers: tuple[str, str] = SEED_MARKERS) -> ReadResult:
    """Rows and rejects of one data file; a DataError if the file as a whole cannot be used.
    `markers` open the instruction and the response of a block in a .txt file."""
    path = Path(path)
    suffix = format_of(path)
    if suffix is None:
        raise DataError(f"{path}: unsupported file type; use one of {READABLE}")
    result = ReadResult()
    data = _file_bytes(path)
    if suffix == ".parquet":
        _read_parquet(path, result, data)
        return result
    if not data.strip(b" \t\r\n\xef\xbb\xbf"):
        raise DataError(f"{path}: the file is empty; add pairs or remove it")
    if suffix == ".txt":
        _read_seed_text(path, data, result, markers)
        return result
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    readers[suffix](path, data, result)
    return result


def data_files(directory: Path, exclude: tuple[str, ...] = (".*",)) -> list[Path]:
    """Every file of `directory`, each of which must be readable: one that is not, and that no glob of
    `exclude` (data.exclude) matches by name, is an error naming it, so that no data is left out unseen."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    files = [p for p in files if not any(fnmatch.fnmatch(p.name, pattern) for pattern in exclude)]
    unreadable = [p for p in files if format_of(p) is None]
    if unreadable:
        names = ", ".join(p.name for p in unreadable)
        raise DataError(
            f"{directory}: no reader for {names}; readable: {READABLE}. Convert it, move it out of the folder, or "
            f"leave it out with data.exclude: {[*exclude, unreadable[0].name]}"
        )
    if not files:
        raise DataError(f"{directory}: no data files ({READABLE}); put instruction/response pairs there")
    return files


def check_inputs(config: FinetuneConfig) -> None:
    """The data files the config names exist: checked before anything heavy is imported."""
    raw_dir, heldout = config.paths.raw_dir, config.paths.heldout_path
    if not raw_dir.is_dir():
        raise ConfigError(f"paths.raw_dir: {raw_dir} is not a folder; point it at the training pairs")
    try:  # no data files, or a file that no reader handles and data.exclude does not leave out
        data_files(raw_dir, tuple(config.data.exclude))
    except DataError as error:
        raise ConfigError(f"paths.raw_dir: {error}") from None
    if not heldout.is_file():
        raise ConfigError(f"paths.heldout_path: {heldout} not found; evaluation needs held-out pairs")
    if not heldout.read_bytes().strip():
        raise ConfigError(f"paths.heldout_path: {heldout} is empty; evaluation needs at least one pair")
