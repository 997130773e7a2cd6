"""The teacher-output quality gate: each check catches its crafted case, a clean reply passes."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import REPO

from empathy_distill.shared import prompts
from empathy_distill.shared.config import QualityConfig
from empathy_distill.stage1_teacher import quality

Q = QualityConfig()
CLEAN = "Oh no, that sounds so stressful. Do you know when the vet can see her?"


def checks(reply: str, q: QualityConfig = Q, **kw) -> list[str]:
    return [c for c, _ in quality.check_reply(reply, q, **kw)]


def test_a_clean_reply_passes_every_check():
    found = quality.check_reply(
        CLEAN,
        Q,
        parse_ok=True,
        finish_reason="stop",
        privileged={"situation": "My dog has lumps on her stomach and sees the vet tomorrow."},
        accepted=Counter({"something else entirely": 5}),
        base="That's bad.",
    )
    assert found == []
    assert quality.verdict(found, Q) == "accept"


@pytest.mark.parametrize("reply", ["", "   ", "\n", "Okay.", "**", "Oh no"])
def test_empty_or_too_short(reply):
    assert checks(reply) == ["empty"]


@pytest.mark.parametrize(
    "reply",
    [
        "I'm so sorry. I'm so sorry.",
        "I'm so sorry, I'm so sorry.",  # one sentence, a clause twice
        "That is hard.\nThat is hard!",
        "I'm here to help you. You can do it. I'M HERE TO HELP YOU",
        "they're happy, because they're happy, because they're happy, because they're happy",
    ],
)
def test_repetition(reply):
    assert checks(reply) == ["repetition"]


def test_a_clause_twice_across_sentences():
    reply = (
        "I'm so sorry, I'm so sorry that we're so divided, that's why I'm so sorry. "
        "I'm so sorry that we're so divided, that's why I'm so sorry."
    )  # seen in a cache: the two sentences differ, their clauses do not
    assert checks(reply) == ["repetition"]


def test_echo_of_the_speaker():
    speaker = "I am so mad, my landlord is selling the house so I have to move."
    echo = "I'm so angry, my landlord is selling the house so I have to move."
    assert checks(echo, speaker=speaker) == ["echo"]
    assert checks("Your landlord is selling? That is a lot to take in.", speaker=speaker) == []


def test_a_repeated_word_is_not_a_repeated_sentence():
    assert checks("Really, really proud of you. What a day for your family!") == []


def test_truncated_only_in_mid_sentence_at_the_length_limit():
    assert checks("That sounds like a lot, and I think", finish_reason="length") == ["truncated"]
    assert checks("That sounds like a lot. I am glad you told me.", finish_reason="length") == []
    assert checks('She said "well done."', finish_reason="length") == []
    assert checks("That sounds like a lot, and I think", finish_reason="stop") == []


def test_unparsed():
    assert checks(CLEAN, parse_ok=False) == ["unparsed"]


def test_leak_of_a_private_note_verbatim():
    notes = {"expert_notes": "The client shows signs of avoidant attachment after her divorce."}
    leaking = "I see. You show signs of avoidant attachment after her divorce, that is hard."
    assert checks(leaking, privileged=notes) == ["leak"]
    # a few shared words are no quote, and neither is echoing what the speaker said
    assert checks("Your divorce must have been hard on you.", privileged=notes) == []
    said = "I think I show signs of avoidant attachment after her divorce."
    assert checks(leaking, privileged=notes, dialogue=said) == []


def test_generic_counts_the_replies_already_accepted():
    accepted = Counter({quality.normalise(CLEAN): 1})
    assert checks(CLEAN.upper(), accepted=accepted) == ["generic"]
    assert checks(CLEAN, QualityConfig(generic_max=2), accepted=accepted) == []


def test_unchanged_improvement():
    assert checks(CLEAN, base="  " + CLEAN.lower()) == ["unchanged"]


def test_policies_decide_the_verdict():
    found = [("repetition", "x"), ("unparsed", "y")]
    assert quality.verdict(found, Q) == "retry"
    q = QualityConfig(repetition="flag", unparsed="reject")
    assert quality.verdict(found, q) == "reject"
    assert quality.verdict(found, QualityConfig(repetition="flag", unparsed="flag")) == "accept"
    assert checks("I'm so sorry. I'm so sorry.", QualityConfig(repetition="off")) == []


# --- the parser's shapes (issue: a one-line answer is all reply) --------------------------------


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\n\n", "  \n", ""])
def test_a_one_line_answer_is_all_reply_whatever_follows(ending):
    text = " I'm not sure what to say." + ending
    out = prompts.parse_teacher_output(text)
    assert out.reply == "I'm not sure what to say."
    assert not out.parse_ok and out.emotion is None
    assert text[out.reply_start : out.reply_end] == out.reply


@pytest.mark.parametrize("text", [" sad", " sad\n", " Sad\r\n", "", "\n"])
def test_only_the_emotion_is_no_reply(text):
    out = prompts.parse_teacher_output(text)
    assert out.reply == "" and not out.parse_ok
    assert checks(out.reply, parse_ok=out.parse_ok) == ["empty", "unparsed"]


def test_markdown_reply_marker():
    out = prompts.parse_teacher_output(" sad\n**Feelings:** low\n**Reply:** Oh no, that is hard.\n")
    assert out.parse_ok and out.reply == "Oh no, that is hard." and out.emotion == "sad"


def test_retries_sample_with_a_seed_per_example_and_attempt():
    from empathy_distill.shared.config import PipelineConfig
    from empathy_distill.stage1_teacher.teacher_cache import generation_params

    cfg = PipelineConfig()
    first = generation_params(cfg, 0, "ex1")
    assert first.temperature == cfg.teacher.temperature and first.seed == cfg.teacher.engine["seed"]
    retry = generation_params(cfg, 1, "ex1")
    assert retry.temperature == cfg.teacher_cache.quality.retry_temperature
    # a top-k, not a nucleus: vLLM's CPU sampler sorts the whole batch's vocabulary for a top-p
    assert (retry.top_k, retry.top_p) == (cfg.teacher_cache.quality.retry_top_k, 1.0)
    assert first.top_k in (0, -1)
    assert retry.seed == generation_params(cfg, 1, "ex1").seed  # a rerun: the same sample
    assert retry.seed != generation_params(cfg, 2, "ex1").seed
    assert retry.seed != generation_params(cfg, 1, "ex2").seed
    cfg.teacher.sampling = {"repetition_penalty": 1.1}
    assert generation_params(cfg, 1, "ex1").repetition_penalty == 1.1


def test_reply_sampling_is_for_the_reply_turns_only():
    """The analysis turn keeps `teacher.sampling` alone (a penalty there breaks its format);
    every reply turn gets `teacher.reply_sampling` over it, and the cache settings record it."""
    from empathy_distill.shared.config import PipelineConfig, load_config
    from empathy_distill.stage1_teacher.teacher_cache import generation_params

    cfg = PipelineConfig()
    cfg.teacher.sampling = {"frequency_penalty": 0.1}
    cfg.teacher.reply_sampling = {"repetition_penalty": 1.1, "frequency_penalty": 0.2}
    analysis, reply = generation_params(cfg, reply=False), generation_params(cfg)
    assert analysis.repetition_penalty == 1.0 and analysis.frequency_penalty == 0.1
    assert reply.repetition_penalty == 1.1 and reply.frequency_penalty == 0.2
    demo = load_config(REPO / "pipelines.yaml", "demo")
    assert demo.teacher.reply_sampling == {"repetition_penalty": 1.1}


@pytest.mark.parametrize(
    "reply",
    [
        "I'm sorry for your loss, but I'm unable to provide a job search response.",
        "As an AI, I don't have feelings, but that sounds hard.",
        "I'm sorry, but as a language AI, I'm designed to assist with language learning.",
        "I am not equipped to give advice about bats, sorry.",
    ],
)
def test_refusals(reply):
    assert "refusal" in checks(reply)


def test_not_every_unable_is_a_refusal():
    assert checks("It hurts to feel unable to help him. I'm here for you.") == []


def test_a_bare_off_from_yaml_turns_a_check_off(tmp_path):
    from empathy_distill.shared.config import load_config

    config = tmp_path / "p.yaml"
    config.write_text("pipelines:\n  t:\n    teacher_cache:\n      quality: {leak: off}\n")
    cfg = load_config(config, "t", ["teacher_cache.quality.echo=off"])
    assert cfg.teacher_cache.quality.leak == "off" and cfg.teacher_cache.quality.echo == "off"


def test_parse_analysis_needs_the_emotion_and_a_step():
    full = prompts.parse_analysis(" sad\nFeelings: low.\nSituation: a move.\nReply: Oh no.")
    assert full.parse_ok and full.emotion == "sad"
    assert full.reasoning == "Emotion: sad\nFeelings: low.\nSituation: a move."  # no reply in it
    only = prompts.parse_analysis(" sad\nFriend: I'm so sorry.")
    assert not only.parse_ok and only.emotion == "sad"
    sentence = prompts.parse_analysis(" I'm not sure I'm ready to talk about it.")
    assert not sentence.parse_ok and sentence.emotion is None
    assert full.feelings == "low." and only.feelings == "" and sentence.feelings == ""
    late = prompts.parse_analysis(" sad\nReply: Oh no.\nFeelings: low.")
    assert late.feelings == ""  # a Feelings field inside a started reply is not the analysis


def test_the_analysis_pattern_admits_each_worked_example_and_nothing_loose():
    import re

    for _, _, answer in prompts.EXAMPLES:
        assert answer.startswith(prompts.ANSWER_PREFIX)
        assert re.fullmatch(prompts.ANALYSIS_PATTERN, answer[len(prompts.ANSWER_PREFIX) :])
    for loose in (
        " I'm so sorry for your loss.",  # a reply in the emotion field
        " sad\nFeelings: low and tired today.",  # no situation step
        " sad\nFeelings: low and tired today.\n\nSituation: a long move away.",  # blank line
    ):
        assert not re.fullmatch(prompts.ANALYSIS_PATTERN, loose)


def test_stock_counts_the_openings_already_accepted():
    accepted: Counter = Counter()
    for i in range(5):
        quality.remember(accepted, f"I'm so sorry to hear that job number {i} is gone.", Q)
    reply = "I'm so SORRY to see you go through this."
    # 5 of 5 accepted replies open with these 4 words: at stock_min and above stock_share
    assert checks(reply, accepted=accepted) == ["stock"]
    assert checks(reply, QualityConfig(stock_min=6), accepted=accepted) == []
    assert checks(reply, QualityConfig(stock_words=5), accepted=accepted) == []
    assert checks("That is hard news. " + reply, accepted=accepted) == []
    # once other openings make it rarer than stock_share, it passes again
    for i in range(30):
        quality.remember(accepted, f"Reply number {i} opens its own way.", Q)
    assert checks(reply, accepted=accepted) == []  # 5 of 35: 14%
    assert checks(reply, QualityConfig(stock_share=0.14), accepted=accepted) == ["stock"]


def test_remember_keeps_generic_and_stock_counts_in_one_counter():
    accepted: Counter = Counter()
    quality.remember(accepted, CLEAN, Q)
    quality.remember(accepted, CLEAN.upper(), Q)
    assert accepted[quality.normalise(CLEAN)] == 2
    assert accepted[(quality.OPENING, "oh no that sounds")] == 2
    assert accepted[quality.TOTAL] == 2


def prefix_checks(text: str, q: QualityConfig = Q, **kw) -> list[str]:
    return [c for c, _ in quality.check_prefix(text, q, **kw)]


def test_a_prefix_fails_only_once_no_continuation_can_pass():
    # the last sentence (clause, word) may still go on: it is not judged yet
    assert prefix_checks("I'm so sorry. I'm so sorry") == []
    assert prefix_checks("I'm so sorry. I'm so sorry. ") == ["repetition"]
    assert prefix_checks("I'm so sorry, I'm so sorry") == []
    assert prefix_checks("I'm so sorry, I'm so sorry,") == ["repetition"]
    accepted: Counter = Counter()
    for i in range(5):
        quality.remember(accepted, f"I'm so sorry to hear that job number {i} is gone.", Q)
    assert prefix_checks("I'm so sorry to", accepted=accepted) == []  # "to" may be "today"
    assert prefix_checks("I'm so sorry to ", accepted=accepted) == ["stock"]
    assert prefix_checks("I'm so sorry today ", accepted=accepted) == []
    # a check that only flags (or is off) never stops a reply
    assert prefix_checks("I'm so sorry. I'm so sorry. ", QualityConfig(repetition="flag")) == []
    assert prefix_checks("I'm so sorry to ", QualityConfig(stock="off"), accepted=accepted) == []
    speaker = "My landlord is selling the house so I have to move out by May."
    long = "Oh no. The house so I have to move out by May is a lot "
    assert prefix_checks(long, speaker=speaker) == ["echo"]


@pytest.mark.parametrize(
    "reply",
    [
        "I'm so sorry. I'm so sorry. I'm so sorry to hear that.",
        "I'm so sorry, I'm so sorry to hear it, so sorry.",
        "That sounds hard. That sounds hard to carry alone. That sounds hard.",
        "As an AI I cannot feel, but I am sorry to hear about your move to the new town.",
        "I'm so sorry to hear about the move, truly, truly, truly, truly, truly.",
        "Your landlord is selling the house so I have to move out by May, right?",
        CLEAN,
    ],
)
def test_every_prefix_problem_is_a_problem_of_the_whole_reply(reply):
    """What stops a reply early is what the gate would find in the finished reply."""
    accepted: Counter = Counter()
    for i in range(5):
        quality.remember(accepted, f"I'm so sorry to hear that job number {i} is gone.", Q)
    context = {
        "speaker": "My landlord is selling the house so I have to move out by May.",
        "privileged": {"situation": "Moving to the new town after the landlord sold up."},
        "accepted": accepted,
    }
    whole = set(checks(reply, **context))
    for cut in range(len(reply) + 1):
        assert set(prefix_checks(reply[:cut], **context)) <= whole, reply[:cut]
    # and the complete reply, followed by anything, shows them
    assert set(prefix_checks(reply + " And", **context)) == whole & set(quality.EARLY)
