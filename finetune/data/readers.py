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
| alpaca | instruction, input (may be empty), output; LLaMA-Factory's optional system and history ([[instruction, response], ...] before it) |
| chat | messages of role and content: user and assistant turns in turn, any number of exchanges, an optional system turn first (Hugging Face chat datasets; OpenAI's chat fine-tuning files, whose `weight` must be 1 where given) |
| sharegpt | conversations of from and value: human and gpt (or user and assistant) in turn, an optional system turn first or a system field (Axolotl's and LLaMA-Factory's sharegpt) |

A row is its last exchange (instruction, response) and the exchanges before it (`history`: user,
assistant, user, assistant, ...; empty for the single-exchange layouts). A system turn's text opens the
first user turn, followed by a blank line, as the saved chat template renders it.

Every row keeps its file and line (the record's number for JSON arrays and Parquet). A row that
cannot be used becomes a reject with a reason; a file that cannot be read at all is a DataError. A file
is named by its path, or by its URL when its bytes come from object storage (finetune/data/sources.py).
"""

from __future__ import annotations

import bz2
import csv
import fnmatch
import gzip
import io
import json
import lzma
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
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
# Rows handed on at a time by read_chunks: a large file is validated and kept as columns chunk by chunk.
CHUNK_ROWS = 50_000


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
    Layout("sharegpt", ("conversations",)),
    Layout("alpaca", ("instruction", "input", "output")),
    Layout("instruction/response", ("instruction", "response")),
    Layout("prompt/completion", ("prompt", "completion")),
    Layout("input/output", ("input", "output")),
)
INSTRUCTION_RESPONSE = next(layout for layout in LAYOUTS if layout.name == "instruction/response")
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
    if text.isascii():  # NFC leaves ASCII as it is and no format character is ASCII
        return text.strip()
    return "".join(c for c in unicodedata.normalize("NFC", text) if unicodedata.category(c) != "Cf").strip()


# Unicode categories Cc (controls) but tab, newline and carriage return, and Cs (lone surrogates).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _text_problem(name: str, value: Any) -> str | None:
    if not isinstance(value, str):
        kind = "nothing" if value is None else type(value).__name__
        return f"{name} must be text, got {kind}"
    if bad := _CONTROL.search(value):
        return f"{name} contains the control character U+{ord(bad.group()):04X}"
    return None


# ShareGPT speakers (Axolotl, LLaMA-Factory, FastChat) as chat roles; tool calls and their results are not trained on here.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}


def _listed(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value  # a Parquet list cell reads back as an array


def sharegpt_messages(record: dict[str, Any]) -> tuple[list[dict] | None, str | None]:
    """A ShareGPT record's turns ({from, value}) as chat messages ({role, content}), its `system` field
    first where it has one; or (None, reason)."""
    turns = _listed(record["conversations"])
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None, "conversations must be a list of {from, value} objects"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for turn in turns:
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            return None, (
                f"conversations: a turn from {turn.get('from')!r}; understood speakers are human and gpt (or user and "
                "assistant), with an optional system turn first (tool calls and observations are not trained on)"
            )
        messages.append({"role": role, "content": turn.get("value")})
    return messages, None


def chat_turns(messages: Any) -> tuple[list[str] | None, str | None]:
    """(texts of the turns: user, assistant, user, ..., assistant; None) or (None, reason) for a chat
    record's messages. A system turn may come first; its text opens the first user turn. An OpenAI
    `weight` of 0 on an assistant turn (that turn not trained on) is refused: every turn here is trained."""
    messages = _listed(messages)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None, "messages must be a list of {role, content} objects"
    if any(m.get("weight") not in (None, 1) for m in messages):
        return None, ("an assistant turn has weight 0 (OpenAI: not trained on); every assistant turn is trained here: "
                      "set weight 1, or end the conversation before that turn")  # fmt: skip
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
    if layout.name in ("chat", "sharegpt"):
        messages, reason = (record["messages"], None) if layout.name == "chat" else sharegpt_messages(record)
        texts, reason = chat_turns(messages) if messages is not None else (None, reason)
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
        earlier = _listed(record.get("history")) or []  # LLaMA-Factory: [[instruction, response], ...] before this one
        if not isinstance(earlier, list) or not all(isinstance(p, (list, tuple)) or hasattr(p, "tolist") for p in earlier):
            return None, "history must be a list of [instruction, response] pairs"
        earlier = [_listed(pair) for pair in earlier]
        if any(len(pair) != 2 for pair in earlier):
            return None, "history must be a list of [instruction, response] pairs"
        history = [text for pair in earlier for text in pair]
        for number, text in enumerate(history):
            if problem := _text_problem(f"history[{number // 2}][{number % 2}]", text):
                return None, problem
        system = record.get("system")
        if system is not None and (problem := _text_problem("system", system)):
            return None, problem
        if system and visible_text(system) and isinstance(instruction, str):  # opens the first user turn, as in chat
            if history:
                history[0] = system.strip() + SYSTEM_SEPARATOR + history[0]
            else:
                instruction = system.strip() + SYSTEM_SEPARATOR + instruction
    else:
        instruction, response = (record[name] for name in layout.fields)
    topic = record.get("topic")
    for name, value in (("instruction", instruction), ("response", response)):
        if problem := _text_problem(name, value):
            return None, problem
    if topic is not None and (problem := _text_problem("topic", topic)):
        return None, problem
    return {"instruction": instruction, "response": response, "history": history, "topic": topic}, None


def _add_records(path: Path, numbered: Iterable[tuple[int, Any]], result: ReadResult) -> Iterator[None]:
    """Records (line, parsed value) of one file: the first object decides the layout. Yields after each
    record, so that the caller can hand the rows on in chunks."""
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
        yield


def _decode_lines(path: Path, data: bytes, result: ReadResult) -> Iterator[tuple[int, str]]:
    """UTF-8 lines without BOM or CR, one at a time; a line that is not UTF-8 is rejected on its own."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    number = 0
    for number, raw in enumerate(io.BytesIO(data), start=1):  # the bytes are shared, not copied
        line = raw[:-1] if raw.endswith(b"\n") else raw
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as error:
            result.reject(path, number, f"not valid UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1})")
            continue
        yield number, text
    if not data or data.endswith(b"\n"):
        yield number + 1, ""  # the empty line after the last newline


def _read_jsonl(path: Path, data: bytes, result: ReadResult) -> Iterator[None]:
    def parsed() -> Iterator[tuple[int, Any]]:
        for number, text in _decode_lines(path, data, result):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                result.reject(path, number, f"malformed JSON: {error.msg} at column {error.colno}")
            except RecursionError:
                result.reject(path, number, "malformed JSON: nested too deeply")

    yield from _add_records(path, parsed(), result)


def _read_json(path: Path, data: bytes, result: ReadResult) -> Iterator[None]:
    try:
        parsed = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 at byte {error.start}; save it as UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as error:
        where = f" line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) else ""
        raise DataError(f"{path}:{where}: not valid JSON; a .json file must hold one array of records") from None
    if not isinstance(parsed, list):
        raise DataError(f"{path}: a .json file must hold an array of records, found {type(parsed).__name__}")
    yield from _add_records(path, enumerate(parsed, start=1), result)


def _read_csv(path: Path, data: bytes, result: ReadResult) -> Iterator[None]:
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
            yield
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def _read_parquet(path: Path, data: bytes, result: ReadResult) -> Iterator[None]:
    """Record batches of CHUNK_ROWS rows, so that a large file is never held as Python objects at once."""
    import pyarrow.parquet as pq

    def records() -> Iterator[tuple[int, dict[str, Any]]]:
        number = 0
        try:
            parquet = pq.ParquetFile(io.BytesIO(data))
            _layout_for(path, set(parquet.schema_arrow.names))
            for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
                for number, record in enumerate(batch.to_pylist(), start=number + 1):
                    yield number, {k: (None if _is_missing(v) else v) for k, v in record.items()}
        except DataError:
            raise
        except Exception as error:  # pyarrow raises several types for a file that is not Parquet
            raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__})") from None

    yield from _add_records(path, records(), result)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: an empty Parquet cell


def _read_seed_text(path: Path, data: bytes, result: ReadResult, markers: tuple[str, str]) -> Iterator[None]:
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
        row, reason = _to_pair({"instruction": instruction, "response": response}, INSTRUCTION_RESPONSE)
        if row is None:
            result.reject(path, number, reason)
        else:
            result.rows.append({**row, "source_file": str(path), "source_line": number})
        yield


def format_of(path: Path | str) -> str | None:
    """The plain suffix a file (or an object's URL) is read as (`.jsonl` for data.jsonl.gz too), or None: no
    reader for it."""
    path = PurePosixPath(str(path).rsplit("/", 1)[-1])
    suffix = Path(path.stem).suffix if path.suffix in COMPRESSIONS else path.suffix
    return suffix if suffix in SUFFIXES else None


def _decompressed(path: Path | str, data: bytes) -> bytes:
    suffix = PurePosixPath(str(path)).suffix
    if suffix not in COMPRESSIONS:
        return data
    name, decompress = COMPRESSIONS[suffix]
    try:
        return decompress(data)
    except Exception as error:  # gzip, bz2 and lzma each raise their own types for damaged data
        raise DataError(f"{path}: not a readable {name} file ({type(error).__name__}: {error})") from None


def read_chunks(
    path: Path | str, markers: tuple[str, str] = SEED_MARKERS, empty_ok: bool = False, data: bytes | None = None
) -> Iterator[ReadResult]:
    """Rows and rejects of one data file, in chunks of at most CHUNK_ROWS rows (rejects go with the chunk
    being read); a DataError if the file as a whole cannot be used. `markers` open the instruction and
    the response of a block in a .txt file. `empty_ok`: a file with nothing in it has no rows (an upstream
    export with nothing new today) instead of being an error. `data`: the file's bytes, read elsewhere (an
    object in a bucket, `path` its URL); otherwise the file at `path` is read."""
    suffix = format_of(path)
    if suffix is None:
        raise DataError(f"{path}: unsupported file type; use one of {READABLE}")
    data = _decompressed(path, Path(path).read_bytes() if data is None else data)
    if suffix != ".parquet" and not data.strip(b" \t\r\n\xef\xbb\xbf"):
        if empty_ok:
            yield ReadResult()
            return
        raise DataError(f"{path}: the file is empty; add pairs or remove it")
    result = ReadResult()
    if suffix == ".txt":
        records = _read_seed_text(path, data, result, markers)
    else:
        records = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[suffix](path, data, result)
    yield from _chunked(records, result)


def _chunked(records: Iterator[None], result: ReadResult) -> Iterator[ReadResult]:
    """`result` handed on every CHUNK_ROWS rows while `records` fills it, then the rest."""
    for _ in records:
        if len(result.rows) >= CHUNK_ROWS:  # hand the chunk on; the reader goes on filling `result`
            yield ReadResult(result.rows, result.rejects)
            result.rows, result.rejects = [], []
    yield result


def record_chunks(name: str, records: Iterable[Any]) -> Iterator[ReadResult]:
    """Rows and rejects of records parsed already (a dataset's rows, numbered from 1 as lines), in chunks of
    at most CHUNK_ROWS rows; the first record decides the layout, as in a file."""
    result = ReadResult()
    yield from _chunked(_add_records(name, enumerate(records, start=1), result), result)


def read_pairs(path: Path, markers: tuple[str, str] = SEED_MARKERS) -> ReadResult:
    """All rows and rejects of one data file (read_chunks, joined)."""
    whole = ReadResult()
    for chunk in read_chunks(path, markers):
        whole.rows += chunk.rows
        whole.rejects += chunk.rejects
    return whole


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
    if config.data.sources:
        pass  # listed before prepare (finetune/data/sources.py), where a missing one is named
    elif raw_dir is None:
        raise ConfigError("paths.raw_dir is null and data.sources is empty: name a folder of training pairs, or sources")
    elif not raw_dir.is_dir():
        raise ConfigError(f"paths.raw_dir: {raw_dir} is not a folder; point it at the training pairs")
    else:
        try:  # no data files, or a file that no reader handles and data.exclude does not leave out
            data_files(raw_dir, tuple(config.data.exclude))
        except DataError as error:
            raise ConfigError(f"paths.raw_dir: {error}") from None
    if config.data.heldout_source:
        return  # listed before prepare
    if not heldout.is_file():
        raise ConfigError(f"paths.heldout_path: {heldout} not found; evaluation needs held-out pairs")
    if not heldout.read_bytes().strip():
        raise ConfigError(f"paths.heldout_path: {heldout} is empty; evaluation needs at least one pair")
