"""The command line as a user meets it: help, and one-line errors with a non-zero exit."""

import json
import subprocess
import sys

import pytest
from conftest import DATA, REPO


def run(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "empathy_distill.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def assert_one_line_error(result, *needles):
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("teacher-cache", "distill", "evaluate", "run", "inspect"):
        assert command in result.stdout
    assert "--input" in run("teacher-cache", "--help").stdout


@pytest.mark.parametrize("make", ["missing", "directory", "binary", "unknown-header"])
def test_unreadable_input_stops_with_one_line(tmp_path, make):
    path = tmp_path / "in.csv"
    if make == "directory":
        path.mkdir()
    elif make == "binary":
        path.write_bytes("conv_id,utterance".encode("utf-16") + bytes(range(256)))
    elif make == "unknown-header":
        path.write_text("a,b,c\n1,2,3\n")
    result = run("teacher-cache", "--input", str(path), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "in.csv")


def test_config_problems_are_listed_and_exit_1(tmp_path):
    result = run("teacher-cache", "--set", "teacher_cache.top_k=0", "--set", "teacher.nope=1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "teacher_cache.top_k" in result.stderr and "teacher.nope" in result.stderr


def test_output_made_with_other_settings_is_refused(tmp_path, embedded_teacher):
    out = tmp_path / "cache"
    out.mkdir()
    settings = {"schema_version": 1, "top_k": 5, "teacher_weights_sha256": "x"}
    (out / "manifest.json").write_text(json.dumps({"settings": settings, "shards": []}))
    (out / "resolved_config.yaml").write_text("the run that made this cache\n")
    result = run("teacher-cache", "--input", str(DATA / "ed_sample.csv"), "--output", str(out))
    assert_one_line_error(result, "other settings", "top_k 5 != 20", "new --output")
    # a refused run leaves the cache's description as it was
    assert (out / "resolved_config.yaml").read_text() == "the run that made this cache\n"
    assert not (out / "config_history").exists()


def test_held_out_cache_needs_its_folder_and_evaluate_needs_the_cache(tmp_path):
    unset = run("teacher-cache", "--held-out", "--set", "evaluate.teacher_cache=null")
    assert_one_line_error(unset, "evaluate.teacher_cache is not set")
    missing = tmp_path / "held"
    result = run(
        "evaluate",
        "--set",
        f"evaluate.teacher_cache={missing}",
        "--set",
        f"evaluate.output={tmp_path / 'eval'}",
    )
    assert_one_line_error(result, "no teacher cache at", "teacher-cache --held-out")


def test_inspect_refuses_a_folder_that_is_not_a_cache(tmp_path):
    assert_one_line_error(run("inspect", str(tmp_path)), "not a teacher cache")


def test_setup_models_keeps_intact_builds_and_refuses_foreign_folders(tmp_path, embedded_models):
    result = run("setup-models", "--pipeline", "demo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("intact") == 2  # the demo's teacher and student, built already
    foreign = tmp_path / "models" / "smollm2-135m-student-4l"
    foreign.mkdir(parents=True)
    (foreign / "weights.bin").write_bytes(b"mine")
    config = tmp_path / "p.yaml"
    teacher = embedded_models[0]
    body = f"teacher: {{model: {teacher}}}, student: {{model: {foreign}}}"
    config.write_text(f"pipelines:\n  mine: {{{body}}}\n")
    result = run("setup-models", "--config", str(config))
    assert_one_line_error(result, "left as it is")
    assert [p.name for p in foreign.iterdir()] == ["weights.bin"]
