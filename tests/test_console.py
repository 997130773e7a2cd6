"""The quiet console: the command's own lines on the terminal; Python, C-level and child-process
output in the log file, and the log's last error line for a message."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys
    from pathlib import Path
    from empathy_distill.shared import console

    log = Path(sys.argv[1])
    logging.basicConfig(level=logging.INFO)  # a library logger bound to sys.stderr at import
    console.say("before")
    with console.quiet(log, "test"):
        # until its folder exists, a temporary file
        assert console.log_file() != log or log.parent.is_dir()
        log.parent.mkdir(exist_ok=True)
        assert console.log_file() == log
        print("python print")
        logging.getLogger("engine").info("engine INFO line")
        os.write(1, b"c-level write\\n")
        subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"], check=True)
        print("ValueError: the real cause", file=sys.stderr)
        console.say("our line")
        console.say("our warning", error=True)
        sys.stdout.flush(); sys.stderr.flush()
        print("LAST", console.last_error_line(), file=console.out())
    print("after")
    print("LOG", console.log_file(), console.last_log == log)
    """
)


def run(tmp_path, log_name="cmd.log"):
    log = tmp_path / "out" / log_name
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done, log


def test_engine_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path):
    done, log = run(tmp_path)
    assert done.stdout.splitlines() == [
        "before",
        "our line",
        "LAST ValueError: the real cause",
        "after",
        "LOG None True",
    ]
    assert done.stderr.strip() == "our warning"
    text = log.read_text()
    for line in (
        "python print",
        "engine INFO line",
        "c-level write",
        "child stdout",
        "child stderr",
    ):
        assert line in text
    assert "our line" not in text


def test_a_rerun_appends_and_reads_only_its_own_errors(tmp_path):
    run(tmp_path)
    log = tmp_path / "out" / "cmd.log"
    log.write_text(log.read_text() + "RuntimeError: an old run's error\n")
    done, _ = run(tmp_path)
    assert "LAST ValueError: the real cause" in done.stdout
    assert log.read_text().count("=== ") == 2


def test_without_real_descriptors_nothing_is_redirected(tmp_path, capsys):
    from empathy_distill.shared import console

    # pytest's capture replaces sys.stdout with an object without file descriptor 1
    with console.quiet(tmp_path / "x.log"):
        console.say("seen")
        assert console.log_file() is None
    assert console.last_log is None and not (tmp_path / "x.log").exists()
    assert "seen" in capsys.readouterr().out
