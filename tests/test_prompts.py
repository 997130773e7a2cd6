import pytest
from transformers import AutoTokenizer

from empathy_distill.shared import prompts


@pytest.fixture(scope="module")
def tiny_tokenizer(embedded_teacher):
    return AutoTokenizer.from_pretrained(embedded_teacher)


def test_parse_well_formed_answer():
    text = " sad\nFeelings: hurt and alone.\nSituation: lost a job.\nReply: That sounds so hard."
    out = prompts.parse_teacher_output(text)
    assert out.parse_ok
    assert out.emotion == "sad"
    assert out.reply == "That sounds so hard."
    assert out.reasoning.startswith("Emotion: sad") and "Situation: lost a job." in out.reasoning
    assert text[out.reply_start : out.reply_end] == out.reply


def test_reply_stops_where_the_teacher_starts_the_format_over():
    text = " Happy!\nReply: Great news, congratulations.\nEmotion: happy\nReply: again"
    out = prompts.parse_teacher_output(text)
    assert out.parse_ok and out.emotion == "happy"
    assert out.reply == "Great news, congratulations."
    assert text[out.reply_start : out.reply_end] == out.reply


def test_markdown_bold_markers_and_case():
    out = prompts.parse_teacher_output(" **Angry**\n**REPLY:** I hear you.")
    assert out.parse_ok and out.emotion == "angry" and out.reply == "I hear you."


def test_garbage_is_kept_with_a_flag():
    text = " !!!\n\n12 34 \u2603 lorem ipsum"
    out = prompts.parse_teacher_output(text)
    assert not out.parse_ok
    assert out.emotion is None
    assert out.reply == "12 34 \u2603 lorem ipsum"
    assert text[out.reply_start : out.reply_end] == out.reply
    one_line = prompts.parse_teacher_output(" I am so sorry about that")
    assert not one_line.parse_ok and one_line.reply == "I am so sorry about that"
    empty = prompts.parse_teacher_output("")
    assert not empty.parse_ok and empty.reply == "" and empty.emotion is None


def test_empty_reply_field_falls_back():
    out = prompts.parse_teacher_output(" sad\nReply:   ")
    assert not out.parse_ok and out.emotion == "sad"


def test_teacher_prompt_shows_privileged_notes_and_dialogue(tiny_tokenizer):
    dialogue = [
        {"role": "speaker", "text": "I failed my exam."},
        {"role": "listener", "text": "Oh no, what happened?"},
        {"role": "speaker", "text": "I froze."},
    ]
    text = prompts.teacher_prompt(
        tiny_tokenizer, dialogue, {"situation": "A maths exam.", "future": "x"}
    )
    assert text.endswith("<|im_start|>assistant\n" + prompts.ANSWER_PREFIX)
    assert "- Situation: A maths exam." in text and "- Future: x" in text
    assert "Speaker: I failed my exam.\nListener: Oh no, what happened?\nSpeaker: I froze." in text
    assert all(answer in text for _, _, answer in prompts.EXAMPLES)  # worked examples first
    assert text.index(prompts.EXAMPLES[-1][2]) < text.index("I froze.")
    student = prompts.student_prompt(tiny_tokenizer, dialogue)
    assert "A maths exam." not in student and "Emotion" not in student
    assert student.endswith("<|im_start|>assistant\n")
    assert student.count("<|im_start|>user") == 2


def test_the_reply_turn_is_the_plain_chat_turn_plus_the_feelings_step(tiny_tokenizer):
    dialogue = [{"role": "speaker", "text": "I failed my exam."}]
    analysis = prompts.parse_analysis(
        " sad\nFeelings: They feel let down by themselves.\nSituation: A maths exam went badly."
    )
    text = prompts.reply_prompt(tiny_tokenizer, dialogue, analysis)
    assert prompts.STUDENT_SYSTEM + " They feel let down by themselves." in text
    assert "maths" not in text and "Emotion" not in text  # only the feelings step conditions it
    bare = prompts.reply_prompt(tiny_tokenizer, dialogue, prompts.parse_analysis(" sad"))
    assert bare == prompts.student_prompt(tiny_tokenizer, dialogue)  # no step: the plain turn


def test_template_hash_is_stable_and_sensitive(monkeypatch):
    h = prompts.template_sha256(prompts.template_text())
    assert h == prompts.template_sha256(prompts.template_text())
    monkeypatch.setattr(prompts, "TEACHER_SYSTEM", prompts.TEACHER_SYSTEM + " ")
    assert prompts.template_sha256(prompts.template_text()) != h


def test_improve_prompts_for_every_strategy(tiny_tokenizer):
    dialogue = [{"role": "speaker", "text": "My dog died."}]
    for strategy in ("plain", "all", "weakest", "named"):
        text = prompts.improve_prompt(tiny_tokenizer, dialogue, "Oh.", strategy, "affective", [])
        assert "Speaker: My dog died." in text and "Reply to improve: Oh." in text
        assert text.endswith("Weakest:" if strategy == "weakest" else "Improved reply:")
    named = prompts.improve_prompt(tiny_tokenizer, dialogue, "Oh.", "named", "cognitive", [])
    assert "cognitive empathy" in named
    all_three = prompts.improve_prompt(tiny_tokenizer, dialogue, "Oh.", "all", "affective", [])
    assert all(d in all_three for d in prompts.DIMENSIONS)


def test_sequential_is_a_three_turn_exchange(tiny_tokenizer):
    dialogue = [{"role": "speaker", "text": "My dog died."}]
    assert prompts.improve_turns("sequential") == 3 and prompts.improve_turns("all") == 1
    last = prompts.improve_prompt(tiny_tokenizer, dialogue, "Oh.", "sequential", "x", ["r1", "r2"])
    assert last.index("cognitive empathy") < last.index("Improved reply: r1")
    assert last.index("r1") < last.index("affective empathy") < last.index("r2")
    assert last.index("r2") < last.index("compassionate empathy")
    assert last.count("<|im_start|>assistant") == 3  # two earlier answers + the primed one


@pytest.mark.parametrize(
    ("answer", "reply"),
    [
        (
            "Awesome! I completely agree with your suggestion. Here's a rewritten version with "
            "empathy in all three dimensions:",
            "",
        ),
        (
            " Here's an improved response:\n\nThat sounds so hard. How are you holding up?",
            "That sounds so hard. How are you holding up?",
        ),
        (" Here is the revised reply: I'm glad you told me.", "I'm glad you told me."),
        # a reply that merely says "here is" is kept whole
        (" Here is what I think: you deserve a rest.", "Here is what I think: you deserve a rest."),
    ],
)
def test_an_announcing_first_line_is_not_the_improved_reply(answer, reply):
    parsed = prompts.parse_improved_output(answer, "all")
    assert parsed.reply == reply and answer[parsed.reply_start : parsed.reply_end] == reply


def test_parse_improved_output():
    plain = prompts.parse_improved_output(" That must hurt so much. ", "all")
    assert plain.parse_ok and plain.reply == "That must hurt so much."
    assert " That must hurt so much. "[plain.reply_start : plain.reply_end] == plain.reply
    text = " affective\nImproved reply: I'm so sorry, you loved him."
    weakest = prompts.parse_improved_output(text, "weakest")
    assert weakest.parse_ok and weakest.reply == "I'm so sorry, you loved him."
    assert weakest.reasoning == "Weakest: affective"
    assert text[weakest.reply_start : weakest.reply_end] == weakest.reply
    fallback = prompts.parse_improved_output(" cognitive\nSorry about that.", "weakest")
    assert not fallback.parse_ok and fallback.reply == "Sorry about that."
    assert not prompts.parse_improved_output("   ", "plain").parse_ok
