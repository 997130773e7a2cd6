"""A corpus of bad inputs, each with the one line the CLI must answer with (exit 1, no traceback).

Every case fails before an engine starts, so the corpus runs in-process in a few seconds. Record
level faults (a bad JSONL line is a counted reject, not an error) are in test_readers.py."""

import os

import pytest
import vllm  # noqa: F401  (its logger binds to the real stderr, not to a CliRunner's)
from conftest import DATA
from typer.testing import CliRunner

from empathy_distill.cli import app

ED = str(DATA / "ed_sample.csv")


def _file(tmp, name="taken", text="x"):
    path = tmp / name
    path.write_text(text)
    return str(path)


def _config(tmp, text):
    return ["teacher-cache", "--config", _file(tmp, "p.yaml", text)]


def _fifo(tmp):
    os.mkfifo(tmp / "pipe.jsonl")
    return str(tmp / "pipe.jsonl")


def _loop(tmp):
    (tmp / "loop.csv").symlink_to(tmp / "loop.csv")
    return str(tmp / "loop.csv")


def _cache(tmp, manifest):
    """A cache folder whose manifest.json holds `manifest` (JSON text)."""
    (tmp / "cache").mkdir()
    (tmp / "cache" / "manifest.json").write_text(manifest)
    return str(tmp / "cache")


ENTRY = '{"file": "shard-00000.parquet", "rows": 1, "reply_tokens": 1, "bytes": 1, "sha256": "x"}'
BAD_MANIFESTS = {
    "foreign manifest": ('{"tool": "other"}', "no settings object"),
    "manifest is a list": ("[1, 2]", "a JSON list"),
    "shard entry without sha256": (
        '{"settings": {}, "shards": [' + ENTRY.replace(', "sha256": "x"', "") + "]}",
        "no sha256",
    ),
    "shard listed twice": ('{"settings": {}, "shards": [' + ENTRY + ", " + ENTRY + "]}", "twice"),
}


# (case, argv built in tmp_path, words the one error line must hold)
CASES = [
    (
        "cache output is a file",
        lambda t: ["teacher-cache", "--input", ED, "--output", _file(t)],
        ["is a file, not a folder"],
    ),
    (
        "cache output under a file",
        lambda t: ["teacher-cache", "--input", ED, "--output", _file(t) + "/cache"],
        ["is a file, not a folder"],
    ),
    (
        "distill output is a file",
        lambda t: ["distill", "--shards", str(t), "--output", _file(t)],
        ["is a file, not a folder"],
    ),
    (
        "evaluate output is a file",
        lambda t: ["evaluate", "--input", ED, "--output", _file(t)],
        ["is a file, not a folder"],
    ),
    (
        "--set value not YAML",
        lambda t: ["teacher-cache", "--set", "teacher.top_p=@x"],
        ["not valid YAML"],
    ),
    (
        "--set list unclosed",
        lambda t: ["teacher-cache", "--set", "teacher_cache.inputs=[unclosed"],
        ["not valid YAML", "line 1"],
    ),
    (
        "pipeline body is a list",
        lambda t: _config(t, "pipelines:\n  demo: [1, 2]\n"),
        ["is a list"],
    ),
    ("pipeline body is a string", lambda t: _config(t, "pipelines:\n  demo: text\n"), ["is a str"]),
    (
        "config YAML error keeps its place",
        lambda t: _config(t, "pipelines:\n  demo:\n    a: [1\n    b: 2\n"),
        ["line ", "column "],
    ),
    (
        "engine setting typo",
        lambda t: [
            "teacher-cache",
            "--input",
            ED,
            "--output",
            str(t / "c"),
            "--set",
            "teacher.engine.max_modle_len=512",
        ],
        ["max_modle_len", "did you mean 'max_model_len'"],
    ),
    (
        "input is a FIFO",
        lambda t: ["teacher-cache", "--input", _fifo(t), "--output", str(t / "c")],
        ["not a regular file"],
    ),
    (
        "input is a symlink loop",
        lambda t: ["teacher-cache", "--input", _loop(t), "--output", str(t / "c")],
        ["cannot be opened"],
    ),
]


for name, (text, why) in BAD_MANIFESTS.items():
    CASES += [
        (f"inspect: {name}", lambda t, m=text: ["inspect", _cache(t, m)], [why]),
        (
            f"distill: {name}",
            lambda t, m=text: ["distill", "--shards", _cache(t, m), "--output", str(t / "s")],
            [why],
        ),
        (
            f"teacher-cache: {name}",
            lambda t, m=text: ["teacher-cache", "--input", ED, "--output", _cache(t, m)],
            [why],
        ),
    ]


@pytest.mark.parametrize("argv, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, argv, needles):
    result = CliRunner().invoke(app, argv(tmp_path))
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles or []:
        assert needle in lines[0], lines[0]
