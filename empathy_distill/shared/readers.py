"""Read dialogue datasets into `Example`s (one per speaker turn to answer) plus `Reject`s.

Three input formats: the EmpatheticDialogues release CSV (`ed_csv`), the Welivita & Pu rated
CSV (`wp_csv`) and our own JSONL (`jsonl`). A record that cannot be used becomes a `Reject` with a
reason instead of stopping the run; only an input that cannot be read at all raises PipelineError.
Every record the reader considers ends up exactly once in `examples` or `rejects`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from empathy_distill.shared.errors import PipelineError

FORMATS = ("ed_csv", "wp_csv", "jsonl")
SPLITS = ("train", "validation", "test")
ED_COLUMNS = ("conv_id", "utterance_idx", "context", "prompt", "speaker_idx", "utterance")
WP_REQUIRED = ("speaker_uttr", "situation", "response_human")
# (candidate name, reply column, rating column), in the order of the published dataset.
WP_REPLIES = (
    ("human", "response_human", "rating_human"),
    ("chatgpt", "response_chatgpt_empathy", "rating_chatgpt_empathy"),
    ("llama", "response_llama_empathy", "rating_llama_empathy"),
    ("gemini", "response_gemini_empathy", "rating_gemini_empathy"),
    ("mixtral", "response_mixtral_empathy", "rating_mixtral_empathy"),
)
UNDECODABLE = "undecodable bytes (not UTF-8)"
_RECORD_CHARS = 500
# Bytes that are not UTF-8 decode (with surrogateescape) to U+DC80..U+DCFF; NUL means binary/UTF-16.
_BAD_CHARS = re.compile("[\x00\udc80-\udcff]")


# EmpatheticDialogues' 32 emotion labels (its `context` column): the closed set `pipeline
# evaluate` scores emotion recognition against, as PRIDE's tables do.
ED_EMOTIONS = (
    "afraid", "angry", "annoyed", "anticipating", "anxious", "apprehensive", "ashamed", "caring",
    "confident", "content", "devastated", "disappointed", "disgusted", "embarrassed", "excited",
    "faithful", "furious", "grateful", "guilty", "hopeful", "impressed", "jealous", "joyful",
    "lonely", "nostalgic", "prepared", "proud", "sad", "sentimental", "surprised", "terrified",
    "trusting",
)  # fmt: skip


@dataclass
class Example:
    example_id: str
    source: str
    split: str
    dialogue: list[dict]
    privileged: dict[str, str] = field(default_factory=dict)
    media: list[dict] = field(default_factory=list)
    emotion: str | None = None
    reference: str | None = None
    candidates: list[dict] = field(default_factory=list)
    origin: str = ""


@dataclass
class Reject:
    origin: str
    reason: str
    record: str
    example_id: str | None = None  # set when the record became an example (a gate reject)


_Result = tuple[list[Example], list[Reject]]


class _Bad(Exception):
    """A record-level problem; its message becomes the Reject reason."""


def make_example_id(source, dialogue, privileged, media, emotion, reference) -> str:
    """Content hash, so the same record gets the same id on every read (split is not part of it)."""
    content = {
        "source": source,
        "dialogue": dialogue,
        "privileged": privileged,
        "media": media,
        "emotion": emotion,
        "reference": reference,
    }
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# (source, dialogue, privileged, media, emotion, reference): the part of an example that is hashed
Content = tuple[str, list[dict], dict[str, str], list[dict], str | None, str | None]


def _example(origin: str, split: str, content: Content, candidates=()) -> Example:
    """content = (source, dialogue, privileged, media, emotion, reference), the hashed part."""
    source, dialogue, privileged, media, emotion, reference = content
    return Example(
        make_example_id(*content),
        source,
        split,
        dialogue,
        privileged,
        media,
        emotion,
        reference,
        list(candidates),
        origin,
    )


def detect_format(path: Path) -> str:
    """Guess the format from the extension and, for CSV, from the header line."""
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix != ".csv":
        raise PipelineError(f"{path}: unknown input format {suffix!r}; use .csv or .jsonl")
    try:
        with path.open("rb") as f:
            first = f.readline(1 << 20)
    except OSError as err:
        raise PipelineError(f"{path}: cannot be read ({_why(err)}); check the file") from None
    header = _parse_header(path, next(_csv_rows(_decode(path, first)), None))
    fmt = _header_format(header)
    if fmt is None:
        raise PipelineError(
            f"{path}: CSV header fits no known format; expected the EmpatheticDialogues columns "
            f"({','.join(ED_COLUMNS)},...) or the wp_empathy columns ({', '.join(WP_REQUIRED)})"
        )
    return fmt


def read_examples(
    path: Path, fmt: str | None = None, *, future: bool = True, split: str | None = None
) -> tuple[list[Example], list[Reject]]:
    """Read one file. `split` overrides the split of every example; `future=False` drops the
    "future" privileged text (the later turns of the conversation)."""
    path = Path(path)
    _check_file(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise PipelineError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise PipelineError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    text = _decode(path, _read_bytes(path))
    if fmt == "jsonl":
        return _read_jsonl(path, text, future, split)
    rows = _csv_rows(text)
    header = _parse_header(path, next(rows, None))
    if _header_format(header) != fmt:
        raise PipelineError(f"{path}: the CSV header does not match format {fmt!r}; check the file")
    if fmt == "ed_csv":
        return _read_ed(path, header, rows, future, split)
    return _read_wp(path, header, rows, split)


# --- file level helpers ---------------------------------------------------------------------


def _check_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode  # through a symlink: the file it names is what is read
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found; check the path") from None
    except (OSError, RuntimeError) as err:  # a symlink loop, no permission
        raise PipelineError(f"{path}: cannot be opened ({_why(err)}); check the path") from None
    if stat.S_ISDIR(mode):
        raise PipelineError(f"{path}: is a directory, not a file; give one data file")
    if not stat.S_ISREG(mode):
        raise PipelineError(
            f"{path}: is not a regular file (a pipe, socket or device); give one data file"
        )


def _why(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise PipelineError(f"{path}: cannot be read ({_why(err)}); check the file") from None


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 with surrogateescape, so one bad row does not lose the whole file."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PipelineError(f"{path}: is UTF-16 text; save it as UTF-8 and retry")
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and not any(_is_clean(line) for line in lines):
        raise PipelineError(f"{path}: no line decodes as UTF-8 text; convert the file to UTF-8")
    return text


def _is_clean(text: str) -> bool:
    return _BAD_CHARS.search(text) is None


def _clip(raw: str) -> str:
    """Raw record text for a Reject, printable (bad bytes shown as U+FFFD) and short."""
    text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace").rstrip("\r\n")
    return text if len(text) <= _RECORD_CHARS else text[:_RECORD_CHARS] + "..."


def _text(value: str) -> str:
    # The ED release writes commas inside text as "_comma_"; restoring it elsewhere is harmless.
    return value.replace("_comma_", ",").strip()


def _emotion(value: str | None) -> str | None:
    return (value or "").strip().lower() or None


def _split_from_name(name: str) -> str:
    name = name.lower()
    if name.startswith(("valid", "dev")):
        return "validation"
    return "test" if name.startswith("test") else "train"


# --- CSV -------------------------------------------------------------------------------------


def _csv_rows(text: str) -> Iterator[tuple[int, str, list[str] | str]]:
    """Yield (first line number, raw text, fields or a CSV error message) for each record.

    Quoted fields may span lines, so the raw text is collected from the lines the csv module
    pulls. Blank lines are not records and are skipped.
    """
    consumed: list[str] = []

    def lines() -> Iterator[str]:
        for line in io.StringIO(text, newline=""):  # newline="": split only on \r, \n
            consumed.append(line)
            yield line

    reader = csv.reader(lines())
    line_no = 1
    while True:
        try:
            fields: list[str] | str = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            fields = f"unreadable CSV row: {err}"
        raw, first = "".join(consumed), line_no
        line_no += len(consumed)
        consumed.clear()
        if fields:
            yield first, raw, fields


def _parse_header(path: Path, record: tuple | None) -> list[str]:
    """Column names from the first CSV record (None when the file has no record at all)."""
    header = record[2] if record else None
    if not header or isinstance(header, str):
        raise PipelineError(f"{path}: no readable CSV header line; check that this is the file")
    if not all(_is_clean(name) for name in header):
        raise PipelineError(f"{path}: the header is not UTF-8 text; convert the file to UTF-8")
    return [name.strip() for name in header]


def _header_format(header: list[str]) -> str | None:
    if tuple(header[: len(ED_COLUMNS)]) == ED_COLUMNS:
        return "ed_csv"
    if set(WP_REQUIRED) <= set(header):
        return "wp_csv"
    return None


# --- EmpatheticDialogues ---------------------------------------------------------------------


@dataclass
class _Conversation:
    conv_id: str
    turns: list[tuple[int, str]] = field(default_factory=list)  # (line number, text), idx 1, 2..
    emotion: str | None = None
    situation: str = ""
    broken: bool = False  # a malformed row was seen: later turns cannot be placed


def _read_ed(path, header, rows, future, split) -> _Result:
    split = split or _split_from_name(path.name)
    col = {name: i for i, name in enumerate(header)}
    examples: list[Example] = []
    rejects: list[Reject] = []
    conv: _Conversation | None = None
    for line_no, raw, fields in rows:
        origin = f"{path}:row {line_no}"
        conv_id = _ed_field(fields, col["conv_id"])
        if conv is None or (conv_id and conv_id != conv.conv_id):
            if conv is not None:
                examples += _ed_examples(path, conv, future, split)
            conv = _Conversation(conv_id)
        problem = _ed_problem(raw, fields, len(header), col)
        idx = 0 if problem else int(fields[col["utterance_idx"]])
        if not problem and not conv.broken and idx != len(conv.turns) + 1:
            problem = f"utterance_idx {idx} out of sequence (expected {len(conv.turns) + 1})"
        if problem:
            rejects.append(Reject(origin, problem, _clip(raw)))
            conv.broken = True
        elif conv.broken:
            if idx % 2 == 1:  # only speaker turns are records; listener turns just go unused
                reason = f"follows a malformed turn in conversation {conv.conv_id}"
                rejects.append(Reject(origin, reason, _clip(raw)))
        else:
            if idx == 1:  # the speaker's first row carries the emotion and the situation
                conv.emotion = _emotion(fields[col["context"]])
                conv.situation = _text(fields[col["prompt"]])
            conv.turns.append((line_no, _text(fields[col["utterance"]])))
    if conv is not None:
        examples += _ed_examples(path, conv, future, split)
    return examples, rejects


def _ed_field(fields: list[str] | str, i: int) -> str:
    """A field of a possibly malformed row, "" when absent or undecodable."""
    if isinstance(fields, str) or i >= len(fields) or not _is_clean(fields[i]):
        return ""
    return fields[i].strip()


def _ed_problem(raw: str, fields: list[str] | str, width: int, col: dict[str, int]) -> str | None:
    if isinstance(fields, str):
        return fields
    if not _is_clean(raw):
        return UNDECODABLE
    if len(fields) != width:
        return f"expected {width} fields, got {len(fields)} (unescaped comma?)"
    if not fields[col["conv_id"]].strip():
        return "empty conv_id"
    idx = fields[col["utterance_idx"]].strip()
    if not (idx.isascii() and idx.isdigit()):
        return f"utterance_idx {idx!r} is not an integer"
    if not _text(fields[col["utterance"]]):
        return "empty utterance"
    return None


def _ed_examples(path: Path, conv: _Conversation, future: bool, split: str) -> list[Example]:
    """One example per speaker turn (even positions: utterance_idx 1, 3, ...)."""
    roles = ["speaker" if i % 2 == 0 else "listener" for i in range(len(conv.turns))]
    examples = []
    for i in range(0, len(conv.turns), 2):
        dialogue = [{"role": roles[j], "text": conv.turns[j][1]} for j in range(i + 1)]
        has_reference = i + 1 < len(conv.turns)
        reference = conv.turns[i + 1][1] if has_reference else None
        privileged = {"situation": conv.situation} if conv.situation else {}
        later = range(i + 2, len(conv.turns))
        if future and later:
            lines = [f"{roles[j].capitalize()}: {conv.turns[j][1]}" for j in later]
            privileged["future"] = "\n".join(lines)
        first, last = conv.turns[0][0], conv.turns[i + 1 if has_reference else i][0]
        origin = f"{path}:rows {first}-{last}" if last > first else f"{path}:row {first}"
        content: Content = (
            "empathetic_dialogues",
            dialogue,
            privileged,
            [],
            conv.emotion,
            reference,
        )
        examples.append(_example(origin, split, content))
    return examples


# --- Welivita & Pu rated replies ---------------------------------------------------------------


def _read_wp(path, header, rows, split) -> _Result:
    col = {name: i for i, name in enumerate(header)}
    examples: list[Example] = []
    rejects: list[Reject] = []
    for line_no, raw, fields in rows:
        origin = f"{path}:row {line_no}"
        try:
            examples.append(_wp_example(raw, fields, len(header), col, origin, split))
        except _Bad as bad:
            rejects.append(Reject(origin, str(bad), _clip(raw)))
    return examples, rejects


def _wp_example(raw, fields, width, col, origin, split) -> Example:
    if isinstance(fields, str):
        raise _Bad(fields)
    if not _is_clean(raw):
        raise _Bad(UNDECODABLE)
    if len(fields) != width:
        raise _Bad(f"expected {width} fields, got {len(fields)}")

    def get(name: str) -> str:
        return _text(fields[col[name]]) if name in col else ""

    for name in WP_REQUIRED:
        if not get(name):
            raise _Bad(f"empty {name}")
    ratings = [_rating(get(rating)) for _, _, rating in WP_REPLIES]
    candidates = [
        {"name": name, "text": get(reply), "rating": rating}
        for (name, reply, _), rating in zip(WP_REPLIES, ratings, strict=True)
        if get(reply)
    ]
    if split is None:  # Xie et al.'s hold-out: contexts where fewer than two replies are good
        split = "test" if sum(r == 3 for r in ratings) < 2 else "train"
    dialogue = [{"role": "speaker", "text": get("speaker_uttr")}]
    privileged = {"situation": get("situation")}
    emotion, reference = _emotion(get("emotion")), get("response_human")
    content: Content = ("wp_empathy", dialogue, privileged, [], emotion, reference)
    return _example(origin, split, content, candidates)


def _rating(value: str) -> float | None:
    try:
        rating = float(value)
    except ValueError:
        return None
    return rating if math.isfinite(rating) else None


# --- JSONL -----------------------------------------------------------------------------------


def _read_jsonl(path, text, future, split) -> _Result:
    base = path.parent.resolve()
    examples: list[Example] = []
    rejects: list[Reject] = []
    # split("\n"), not splitlines(): U+2028 and friends are legal inside JSON strings.
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        origin = f"{path}:line {line_no}"
        try:
            if not _is_clean(line):
                raise _Bad(UNDECODABLE)
            record = _json_record(line)
            if not isinstance(record, dict):
                raise _Bad("not a JSON object")
            if record.get("id") is not None:
                origin += f" (id {record['id']})"
            examples.append(_jsonl_example(record, base, path.stem, origin, future, split))
        except _Bad as bad:
            rejects.append(Reject(origin, str(bad), _clip(line)))
    return examples, rejects


def _json_record(line: str):
    """One parsed JSONL line, or _Bad for a line the parser or the encoder cannot take: each
    is one reject, never a crash that loses the file's good records."""
    try:
        record = json.loads(line)
        # The record's text goes into hashes and Parquet as UTF-8: a lone surrogate escape
        # ("\udc80") parses, then fails there.
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as err:
        raise _Bad(f"invalid JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise _Bad("invalid JSON: nested too deeply") from None
    except UnicodeEncodeError:
        raise _Bad(
            "a string holds a lone surrogate escape (e.g. \\udc80): not Unicode text"
        ) from None
    except ValueError as err:  # e.g. an integer of more than 4,300 digits
        raise _Bad(f"invalid JSON: {err}") from None
    return record


def _jsonl_example(record, base, source, origin, future, split) -> Example:
    dialogue = _jsonl_dialogue(record.get("dialogue"))
    privileged = record.get("privileged") or {}
    if not isinstance(privileged, dict):
        raise _Bad("privileged is not an object")
    for name, value in privileged.items():
        if not isinstance(value, str):
            raise _Bad(f"privileged {name!r} is not a string")
    privileged = {k: v.strip() for k, v in privileged.items() if v.strip()}
    if not future:
        privileged.pop("future", None)
    media = record.get("media") or []
    if not isinstance(media, list):
        raise _Bad("media is not a list")
    media = [_jsonl_media(entry, base, n) for n, entry in enumerate(media, 1)]
    emotion = _emotion(_optional_str(record, "emotion"))
    reference = _optional_str(record, "reference").strip() or None
    split = split or _optional_str(record, "split").strip() or "train"
    if split not in SPLITS:
        raise _Bad(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return _example(origin, split, (source, dialogue, privileged, media, emotion, reference))


def _jsonl_dialogue(dialogue) -> list[dict]:
    if dialogue is None:
        raise _Bad("no dialogue")
    if not isinstance(dialogue, list):
        raise _Bad("dialogue is not a list")
    if not dialogue:
        raise _Bad("empty dialogue")
    turns = []
    for n, turn in enumerate(dialogue, 1):
        if not isinstance(turn, dict):
            raise _Bad(f"turn {n} is not an object")
        if turn.get("role") not in ("speaker", "listener"):
            raise _Bad(f"turn {n}: role {turn.get('role')!r} is not speaker/listener")
        text = turn.get("text")
        if text is not None and not isinstance(text, str):
            raise _Bad(f"turn {n}: text is a {type(text).__name__}, not a string")
        if not text or not text.strip():
            raise _Bad(f"turn {n}: empty text")
        turns.append({"role": turn["role"], "text": text.strip()})
    if turns[-1]["role"] != "speaker":
        raise _Bad("last turn is not the speaker's")
    return turns


def _jsonl_media(entry, base: Path, n: int) -> dict:
    if not isinstance(entry, dict):
        raise _Bad(f"media {n} is not an object")
    if entry.get("type") not in ("image", "video"):
        raise _Bad(f"media {n}: type {entry.get('type')!r} is not image/video")
    rel = entry.get("path")
    if not isinstance(rel, str) or not rel.strip():
        raise _Bad(f"media {n}: no path")
    if Path(rel).is_absolute():
        raise _Bad(f"media {n}: path {rel!r} is absolute; make it relative to the JSONL file")
    try:
        full = (base / rel).resolve()
    except (OSError, ValueError) as err:  # e.g. a NUL character, a symlink loop
        raise _Bad(f"media {n}: invalid path {rel!r}: {err}") from None
    if not full.is_relative_to(base):
        raise _Bad(f"media {n}: path {rel!r} leaves the folder of the JSONL file")
    if not full.is_file():
        raise _Bad(f"media {n}: file not found: {rel}")
    times = {}
    for key in ("start", "end"):
        value = entry.get(key)
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok or (value is not None and not math.isfinite(value)):
            raise _Bad(f"media {n}: {key} is not a number")
        times[key] = None if value is None else float(value)
    start, end = times["start"], times["end"]
    if entry["type"] == "image" and (start is not None or end is not None):
        raise _Bad(f"media {n}: start/end apply to videos only")
    if (start or 0.0) < 0 or (end is not None and end <= (start or 0.0)):
        raise _Bad(f"media {n}: time span [{start}, {end}] is empty or negative")
    return {"type": entry["type"], "path": str(full), **times}


def _optional_str(record: dict, key: str) -> str:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise _Bad(f"{key} is not a string")
    return value or ""
