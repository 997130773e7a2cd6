"""Tests for shared/readers.py on small hand-written snippets of each input format."""

import json
import shutil
from pathlib import Path

import pytest

from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.readers import (
    FORMATS,
    Example,
    detect_format,
    make_example_id,
    read_examples,
)

DATA = Path(__file__).parent / "data"


def here(origin: str) -> str:
    """An origin without its folders: origins hold the input's path as it was given."""
    return Path(origin).name


ED = DATA / "ed_sample.csv"
WP = DATA / "wp_sample.csv"
JSONL = DATA / "jsonl" / "sample.jsonl"

ED_HEADER = "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags\n"


def recomputed_id(ex: Example) -> str:
    return make_example_id(
        ex.source, ex.dialogue, ex.privileged, ex.media, ex.emotion, ex.reference
    )


# --- format detection and unreadable inputs ---------------------------------------------------


def test_detect_format_of_each_fixture():
    assert FORMATS == ("ed_csv", "wp_csv", "jsonl")
    assert detect_format(ED) == "ed_csv"
    assert detect_format(WP) == "wp_csv"
    assert detect_format(JSONL) == "jsonl"


def test_csv_with_unknown_header_is_an_error(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("id,question,answer\n1,How are you?,Fine\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="other.csv"):
        detect_format(path)
    with pytest.raises(PipelineError):
        read_examples(path)


def test_missing_file_directory_and_unknown_extension_are_errors(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        read_examples(tmp_path / "nope.csv")
    with pytest.raises(PipelineError, match="directory"):
        read_examples(tmp_path)
    with pytest.raises(PipelineError, match="directory"):
        detect_format(tmp_path)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="unknown input format"):
        detect_format(text_file)


def test_explicit_format_must_fit_the_file():
    with pytest.raises(PipelineError, match="does not match"):
        read_examples(WP, "ed_csv")
    with pytest.raises(PipelineError, match="unknown format"):
        read_examples(ED, "parquet")


def test_empty_csv_is_an_error(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"")
    with pytest.raises(PipelineError):
        read_examples(path)


def test_utf16_or_binary_file_is_an_error(tmp_path):
    utf16 = tmp_path / "train.csv"
    utf16.write_bytes((ED_HEADER + "hit:1_conv:2,1,sad,x,1,y,,\n").encode("utf-16"))
    with pytest.raises(PipelineError, match="UTF"):
        read_examples(utf16)
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\n\x89\xfe\xfa\x00\x00\n")
    with pytest.raises(PipelineError, match="UTF-8"):
        read_examples(binary)


def test_bad_split_argument_is_an_error():
    with pytest.raises(PipelineError, match="split"):
        read_examples(ED, split="dev")


# --- EmpatheticDialogues CSV -----------------------------------------------------------------


def test_ed_examples_per_speaker_turn_with_reference_and_future():
    examples, _ = read_examples(ED)
    marathon = [ex for ex in examples if "marathon" in ex.dialogue[0]["text"]]
    assert [len(ex.dialogue) for ex in marathon] == [1, 3, 5]
    first, second, last = marathon
    assert first.source == "empathetic_dialogues"
    assert first.split == "train"
    assert first.emotion == "proud"
    assert first.dialogue == [
        {"role": "speaker", "text": "My daughter just ran her first marathon!"}
    ]
    # _comma_ restored and whitespace stripped, in the situation and in the utterances
    situation = "My daughter finished her first marathon, and I cried at the finish line."
    assert first.privileged["situation"] == situation
    assert first.reference == "Wow, that is amazing! How did she do?"
    assert first.privileged["future"] == (
        "Speaker: She finished in under five hours, which was her goal.\n"
        "Listener: You must be so proud of her.\n"
        "Speaker: I am. I cried a little at the finish line."
    )
    assert [t["role"] for t in second.dialogue] == ["speaker", "listener", "speaker"]
    assert second.reference == "You must be so proud of her."
    assert second.privileged["future"] == "Speaker: I am. I cried a little at the finish line."
    # the last speaker turn has no reply, hence no reference and no future
    assert last.reference is None
    assert last.privileged == {"situation": situation}
    assert here(first.origin) == "ed_sample.csv:rows 2-3"
    assert here(second.origin) == "ed_sample.csv:rows 2-5"
    assert here(last.origin) == "ed_sample.csv:rows 2-6"
    for ex in examples:
        assert ex.dialogue[-1]["role"] == "speaker"
        assert ex.media == [] and ex.candidates == []
        assert ex.example_id == recomputed_id(ex)


def test_ed_short_conversation_and_emotion_normalised():
    examples, _ = read_examples(ED)
    scary = [ex for ex in examples if "downstairs" in ex.dialogue[0]["text"]]
    assert len(scary) == 1
    assert scary[0].emotion == "afraid"  # " Afraid " in the file
    assert scary[0].reference == "That sounds scary. Was it anything?"
    assert "future" not in scary[0].privileged


def test_ed_malformed_rows_and_accounting():
    examples, rejects = read_examples(ED)
    reasons = {here(r.origin): r.reason for r in rejects}
    assert reasons == {
        "ed_sample.csv:row 11": "empty utterance",
        "ed_sample.csv:row 13": "follows a malformed turn in conversation hit:12_conv:24",
        "ed_sample.csv:row 16": "expected 8 fields, got 9 (unescaped comma?)",
        "ed_sample.csv:row 17": "follows a malformed turn in conversation hit:13_conv:26",
        "ed_sample.csv:row 20": "utterance_idx 4 out of sequence (expected 3)",
        "ed_sample.csv:row 21": "follows a malformed turn in conversation hit:14_conv:28",
        "ed_sample.csv:row 23": "utterance_idx 'two' is not an integer",
        "ed_sample.csv:row 24": "empty conv_id",
    }
    assert rejects[0].record.startswith("hit:12_conv:24,3,lonely,")
    # 11 well-formed speaker turns + 5 malformed rows, each counted once
    assert len(examples) == 8
    assert len(examples) + len(rejects) == 11 + 5
    # turns before the malformed row are kept; the reference/future stop at the malformed row
    lonely = [ex for ex in examples if ex.emotion == "lonely"]
    assert len(lonely) == 1
    assert lonely[0].reference == "Oh no, do you miss her?"
    assert "future" not in lonely[0].privileged
    japan = [ex for ex in examples if ex.emotion == "excited"]
    assert japan[0].reference is None
    assert here(japan[0].origin) == "ed_sample.csv:row 15"


def test_ed_future_off():
    with_future, _ = read_examples(ED)
    without, _ = read_examples(ED, future=False)
    assert len(without) == len(with_future)
    assert all("future" not in ex.privileged for ex in without)
    assert without[0].privileged["situation"] == with_future[0].privileged["situation"]


def test_ed_undecodable_row_and_bom(tmp_path):
    rows = [
        b"hit:1_conv:2,1,sad,My phone broke.,1,My phone broke today.,,\n",
        b"hit:1_conv:2,2,sad,My phone broke.,2,Oh no\xff\xfe what happened?,,\n",
        b"hit:1_conv:2,3,sad,My phone broke.,1,I dropped it in the sink.,,\n",
        b"hit:3_conv:6,1,joyful,I got a puppy_comma_ finally.,3,I got a puppy!,,\n",
        b"hit:3_conv:6,2,joyful,I got a puppy_comma_ finally.,4,How cute!,,\n",
    ]
    path = tmp_path / "test.csv"
    path.write_bytes(b"\xef\xbb\xbf" + ED_HEADER.encode() + b"".join(rows))
    assert detect_format(path) == "ed_csv"
    examples, rejects = read_examples(path)
    assert [r.reason for r in rejects] == [
        "undecodable bytes (not UTF-8)",
        "follows a malformed turn in conversation hit:1_conv:2",
    ]
    assert here(rejects[0].origin) == "test.csv:row 3"
    assert "\ufffd" in rejects[0].record  # printable, bad bytes replaced
    rejects[0].record.encode("utf-8")
    assert [ex.dialogue[0]["text"] for ex in examples] == [
        "My phone broke today.",
        "I got a puppy!",
    ]
    assert examples[0].reference is None
    assert examples[1].privileged["situation"] == "I got a puppy, finally."
    assert all(ex.split == "test" for ex in examples)  # from the file name
    assert len(examples) + len(rejects) == 3 + 1


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("train.csv", "train"),
        ("valid.csv", "validation"),
        ("dev_2.csv", "validation"),
        ("test.csv", "test"),
        ("mine.csv", "train"),
    ],
)
def test_ed_split_from_file_name(tmp_path, name, split):
    path = tmp_path / name
    shutil.copy(ED, path)
    examples, _ = read_examples(path)
    assert {ex.split for ex in examples} == {split}


def test_split_override():
    examples, _ = read_examples(ED, split="validation")
    assert {ex.split for ex in examples} == {"validation"}
    examples, _ = read_examples(WP, split="train")
    assert {ex.split for ex in examples} == {"train"}
    examples, _ = read_examples(JSONL, split="test")
    assert {ex.split for ex in examples} == {"test"}


# --- Welivita & Pu rated CSV -----------------------------------------------------------------


def test_wp_rows_candidates_and_split_rule():
    examples, rejects = read_examples(WP)
    assert len(examples) + len(rejects) == 4  # data rows
    assert [r.reason for r in rejects] == ["empty speaker_uttr"]
    assert here(rejects[0].origin) == "wp_sample.csv:row 6"
    fence, credit, storm = examples
    assert fence.source == "wp_empathy"
    assert fence.dialogue == [
        {
            "role": "speaker",
            "text": "My neighbour fixed my fence while I was away, I didn't even ask!",
        }
    ]
    assert fence.privileged == {"situation": "My neighbour fixed my fence, without being asked."}
    assert fence.emotion == "grateful"
    assert fence.reference == "That is so nice of him.\nDid you thank him?"  # quoted newline
    assert [c["name"] for c in fence.candidates] == [
        "human",
        "chatgpt",
        "llama",
        "gemini",
        "mixtral",
    ]
    assert [c["rating"] for c in fence.candidates] == [3.0, 3.0, 2.0, 3.0, 2.0]
    assert fence.candidates[0]["text"] == fence.reference
    assert here(fence.origin) == "wp_sample.csv:row 2"
    assert here(credit.origin) == "wp_sample.csv:row 4"  # row 1 spans two lines
    # hold-out rule: fewer than two of the five replies rated 3 -> test
    assert (fence.split, credit.split, storm.split) == ("train", "test", "train")
    # empty and non-numeric ratings are None; two 3s is still train
    assert [c["rating"] for c in storm.candidates] == [3.0, None, 3.0, 2.0, None]
    assert storm.emotion == "terrified"
    # two rows share a dialog_id: fine, ids come from the content
    assert fence.example_id != credit.example_id


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_good_lines():
    examples, _ = read_examples(JSONL)
    passed, cat = examples
    assert passed.source == "sample"  # the file's stem
    assert passed.split == "validation"  # from the record
    assert passed.dialogue[0] == {"role": "speaker", "text": "I finally passed my driving test!"}
    assert passed.emotion == "proud"
    assert passed.reference == "Third time's the charm, well done!"
    assert passed.privileged["future"] == "Listener: Third time lucky!"
    media_file = (DATA / "jsonl" / "media" / "smile.png").resolve()
    assert passed.media == [{"type": "image", "path": str(media_file), "start": None, "end": None}]
    assert here(passed.origin) == "sample.jsonl:line 1 (id u1)"
    assert passed.example_id != "u1" and passed.example_id == recomputed_id(passed)
    assert cat.split == "train"
    assert cat.privileged == {} and cat.media == [] and cat.emotion is None
    assert here(cat.origin) == "sample.jsonl:line 2"


def test_jsonl_rejects_and_accounting():
    examples, rejects = read_examples(JSONL)
    reasons = {here(r.origin): r.reason for r in rejects}
    expected = {
        4: "invalid JSON",
        5: "not a JSON object",
        6: "no dialogue",
        7: "empty dialogue",
        8: "role 'assistant' is not speaker/listener",
        9: "empty text",
        10: "last turn is not the speaker's",
        11: "privileged 'situation' is not a string",
        12: "type 'audio' is not image/video",
        13: "is absolute",
        14: "leaves the folder",
        15: "file not found",
    }
    assert set(reasons) == {f"sample.jsonl:line {n}" for n in expected}
    for n, reason in expected.items():
        assert reason in reasons[f"sample.jsonl:line {n}"]
    # 14 non-blank lines (line 3 is blank and not counted)
    assert len(examples) + len(rejects) == 14


def test_jsonl_future_off_video_times_and_undecodable_line(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "wave.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    good = {
        "dialogue": [{"role": "speaker", "text": "Look at this!"}],
        "privileged": {"situation": "A friend waved.", "future": "Listener: Nice."},
        "media": [{"type": "video", "path": "clips/./wave.mp4", "start": 1, "end": 2.5}],
    }
    lines = [
        json.dumps(good).encode(),
        b'{"dialogue": [{"role": "speaker", "text": "caf\xe9"}]}',
        json.dumps({**good, "media": [{"type": "video", "path": "clips/../../x.mp4"}]}).encode(),
    ]
    path = tmp_path / "clips.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    examples, rejects = read_examples(path, future=False)
    assert len(examples) == 1
    (video,) = examples[0].media
    assert video == {
        "type": "video",
        "path": str((tmp_path / "clips" / "wave.mp4").resolve()),
        "start": 1.0,
        "end": 2.5,
    }
    assert examples[0].privileged == {"situation": "A friend waved."}
    assert rejects[0].reason == "undecodable bytes (not UTF-8)"
    assert "leaves the folder" in rejects[1].reason
    assert len(examples) + len(rejects) == 3


# --- example ids -----------------------------------------------------------------------------


def test_ids_stable_across_reads_and_unique():
    for path in (ED, WP, JSONL):
        first, _ = read_examples(path)
        again, _ = read_examples(path)
        ids = [ex.example_id for ex in first]
        assert ids == [ex.example_id for ex in again]
        assert len(set(ids)) == len(ids)
        assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_id_changes_with_content_not_with_split(tmp_path):
    original, _ = read_examples(ED)
    changed_file = tmp_path / "train.csv"
    changed_file.write_text(
        ED.read_text(encoding="utf-8").replace("3am", "4am"),
        encoding="utf-8",
    )
    changed, _ = read_examples(changed_file)
    differ = [
        here(a.origin)
        for a, b in zip(original, changed, strict=True)
        if a.example_id != b.example_id
    ]
    assert differ == ["ed_sample.csv:rows 7-8"]  # only the example whose text changed
    relabelled, _ = read_examples(ED, split="test")
    assert [ex.example_id for ex in relabelled] == [ex.example_id for ex in original]


def test_make_example_id_is_canonical():
    dialogue = [{"role": "speaker", "text": "Ça va?"}]
    a = make_example_id("s", dialogue, {"b": "1", "a": "2"}, [], "sad", None)
    b = make_example_id("s", dialogue, {"a": "2", "b": "1"}, [], "sad", None)
    assert a == b
    assert a != make_example_id("s", dialogue, {"a": "2", "b": "1"}, [], "happy", None)


def test_records_the_parser_or_encoder_cannot_take_are_rejects_not_crashes(tmp_path):
    good = json.dumps({"dialogue": [{"role": "speaker", "text": "I got the job!"}]})
    bad = {
        '{"dialogue": [{"role": "speaker", "text": "bad \\udc80 escape"}]}': "lone surrogate",
        "[" * 100_000 + "]" * 100_000: "nested too deeply",
        '{"n": ' + "9" * 5000 + "}": "invalid JSON",
        '{"dialogue": [{"role": "speaker", "text": 42}]}': "text is a int, not a string",
    }
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, *bad, good.replace("job", "flat")]) + "\n")
    examples, rejects = read_examples(path)
    assert [e.dialogue[0]["text"] for e in examples] == ["I got the job!", "I got the flat!"]
    assert len(rejects) == len(bad)
    for reject, reason in zip(rejects, bad.values(), strict=True):
        assert reason in reject.reason, reject.reason
        assert reject.origin.startswith(str(path))  # the full path: same-named files stay apart


def test_unreadable_inputs_are_one_readable_refusal(tmp_path):
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(PipelineError, match="not a regular file"):
        read_examples(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    with pytest.raises(PipelineError, match="cannot be opened"):
        read_examples(loop)


def test_a_symlinked_input_is_named_by_its_link(tmp_path):
    from empathy_distill.shared.config import load_config

    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    blobs.mkdir(), snap.mkdir()
    record = {"dialogue": [{"role": "speaker", "text": "I passed."}], "split": "test"}
    (blobs / "9f2c41d0e7a3").write_text(json.dumps(record) + "\n")
    (snap / "test.jsonl").symlink_to(blobs / "9f2c41d0e7a3")
    config = tmp_path / "p.yaml"
    config.write_text("pipelines:\n  t:\n    teacher_cache:\n      inputs: [snap/test.jsonl]\n")
    (path,) = load_config(config, "t", []).teacher_cache.inputs
    assert path == snap / "test.jsonl"
    (example,), _ = read_examples(path)  # read through the link, as JSONL by the link's name
    assert here(example.origin) == "test.jsonl:line 1"
