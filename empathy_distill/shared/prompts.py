"""PRIDE's empathy-reasoning prompt (teacher) and the plain prompt (student): written once, hashed.

The teacher works in two turns. The analysis turn sees the dialogue *and* the privileged notes and
reasons step by step (emotion, feelings, situation), primed with "Emotion:" so even a small
teacher keeps the structure; vLLM's structured outputs hold it to the format (ANALYSIS_PATTERN,
`parse_analysis`). The reply turn is the model's natural chat turn: the dialogue as chat
messages, the analysis's Feelings step in the system message (`reply_prompt`); the cached reply,
its top-k and features come from this turn, conditioned on the analysis. Measured on held-out
Welivita & Pu contexts with the 135M teacher, asking for the reply inside the analysis format
(one turn) gave 3 usable replies of 30 (looping "I'm so sorry", replies in the format's fields);
the plain chat turn gave 25 of 30.
The student sees the dialogue only: privileged text reaches it through multi-source attention.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer

TEACHER_SYSTEM = (
    "You are a warm, attentive listener. Before you answer, think step by step: name the "
    "speaker's main emotion, describe their feelings, then analyse their situation."
)

TEACHER_USER = """{notes}Conversation:
{dialogue}

Answer with Emotion, Feelings and Situation."""

NOTES_HEADER = "Private notes (for you only):\n"

# Worked examples in the chat history: a 135M teacher follows a shown format far more often than
# a described one (by hand: 5 of 6 parseable answers against 1 of 4 without one). Three examples
# of different emotions, rather than one, keep it from naming "sad" for everything.
EXAMPLES = (
    (
        [{"role": "speaker", "text": "My best friend told me she's moving abroad."}],
        {"situation": "My best friend is moving to another country next month."},
        "Emotion: sad\n"
        "Feelings: They feel sad and a little abandoned, because someone close is leaving.\n"
        "Situation: Their best friend is moving far away soon, so their daily support will change.",
    ),
    (
        [
            {
                "role": "speaker",
                "text": "I finally passed my driving test today after failing it twice!",
            }
        ],
        {"situation": "I failed my driving test twice before and practised every weekend."},
        "Emotion: proud\n"
        "Feelings: They feel proud and relieved, because their hard work finally paid off.\n"
        "Situation: After two failed attempts and many weekends of practice, they passed their "
        "driving test.",
    ),
    (
        [
            {
                "role": "speaker",
                "text": "My neighbour's dog barked all night again and I have a big presentation "
                "tomorrow.",
            }
        ],
        {"situation": "I have asked my neighbour twice to keep the dog inside at night."},
        "Emotion: annoyed\n"
        "Feelings: They feel annoyed and anxious, because they could not sleep before an "
        "important day.\n"
        "Situation: The neighbour's dog keeps them awake, asking has not helped, and their "
        "presentation is tomorrow.",
    ),
)

# The assistant turn starts with this text, so the teacher's first token is already in the format.
ANSWER_PREFIX = "Emotion:"
# The analysis turn is held to the format by vLLM's structured outputs (this pattern, for the text
# after ANSWER_PREFIX): one lower-case emotion word, then one line each of feelings and situation.
# Free, the 135M teacher followed it in 34.5% of 200 held-out W&P contexts, and often wrote a
# reply or spoke as the speaker in the Emotion field ("Emotion: I'm so sorry for your loss").
# Only the analysis is constrained: the cached reply turn is free.
ANALYSIS_PATTERN = r" [a-z]+\nFeelings: [^\n]{10,200}\nSituation: [^\n]{10,200}"
# Generation stops at a blank line or when the teacher starts the format over.
STOP = ["\n\n", "\nEmotion:"]
# The analysis turn also stops where a teacher starts replying in it: the reply is turn two's.
ANALYSIS_STOP = [*STOP, "\nReply:"]
ANALYSIS_MAX_TOKENS = 96  # an analysis that runs on is cut here (it only conditions the reply)

STUDENT_SYSTEM = "You are a warm, attentive listener. Reply to the speaker with empathy."

# The reply turn is the plain chat turn (STUDENT_SYSTEM) plus the analysis's Feelings step as one
# more sentence of the system message. Tuned on 160 W&P contexts outside the held-out 200 (one
# engine, the same constrained analyses, BERTScore-F1 vs the human reply / Distinct-2): feelings
# only 0.356 / 0.485, feelings + situation 0.354 / 0.473, the whole analysis as labelled notes
# 0.341 / 0.491, the plain chat turn 0.349 / 0.496. The 135M teacher's situation line often
# loops or invents, and a labelled analysis pulls it into an assistant's voice ("I'd be happy
# to help you plan your trip"). Without a Feelings step the reply turn is the plain chat turn.
REPLY_SYSTEM = STUDENT_SYSTEM + " {feelings}"
REPLY_STOP = ["\n\n"]  # the reply is the first paragraph of the chat turn

ROLE_NAMES = {"speaker": "Speaker", "listener": "Listener"}
FIELDS = ("Emotion", "Feelings", "Situation", "Reply")
# A field marker at the start of a line, also in markdown bold: "Reply:", "**Reply:**", "**Reply**:"
_FIELD_RE = re.compile(
    r"^[ \t]*\**[ \t]*(Emotion|Feelings|Situation|Reply)[ \t]*(?::[ \t]*\**|\**[ \t]*:)",
    re.I | re.M,
)


def template_text() -> dict[str, Any]:
    """Everything that shapes what the teacher sees, as written into the manifest."""
    return {
        "system": TEACHER_SYSTEM,
        "user": TEACHER_USER,
        "notes_header": NOTES_HEADER,
        "examples": [[render_dialogue(d), render_notes(p), a] for d, p, a in EXAMPLES],
        "answer_prefix": ANSWER_PREFIX,
        "analysis_pattern": ANALYSIS_PATTERN,
        "stop": ANALYSIS_STOP,
        "analysis_max_tokens": ANALYSIS_MAX_TOKENS,
        "reply_system": REPLY_SYSTEM,
        "reply_stop": REPLY_STOP,
    }


def template_sha256(template: dict) -> str:
    """The manifest's `prompt_template_sha256`: any change to a prompt's text changes it."""
    text = json.dumps(template, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> str:
    """The chat template applied as text, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)  # tokenize=False
    return text


def render_dialogue(dialogue: list[dict]) -> str:
    return "\n".join(f"{ROLE_NAMES[t['role']]}: {t['text']}" for t in dialogue)


def render_notes(privileged: dict[str, str]) -> str:
    if not privileged:
        return ""
    lines = [
        f"- {name.replace('_', ' ').capitalize()}: {text}" for name, text in privileged.items()
    ]
    return NOTES_HEADER + "\n".join(lines) + "\n\n"


def teacher_prompt(
    tokenizer: Tokenizer, dialogue: list[dict], privileged: dict[str, str], n_images: int = 0
) -> str:
    """The full teacher prompt as text (chat template applied, answer primed).

    With `n_images` (a vision-language teacher; `tokenizer` is then its processor) the dialogue's
    user turn starts with that many image items, and the model's own chat template writes its
    image placeholders (LLaVA's `<image>`, Qwen2.5-VL's vision pads) where the model expects them.
    """

    def user(dialogue: list[dict], privileged: dict[str, str]) -> dict:
        text = TEACHER_USER.format(
            notes=render_notes(privileged), dialogue=render_dialogue(dialogue)
        )
        return {"role": "user", "content": text}

    messages: list[dict[str, Any]] = [{"role": "system", "content": TEACHER_SYSTEM}]
    for shown, notes, answer in EXAMPLES:
        messages += [user(shown, notes), {"role": "assistant", "content": answer}]
    messages.append(user(dialogue, privileged))
    if n_images:
        items = [{"type": "text", "text": messages[-1]["content"]}]
        messages[-1]["content"] = [{"type": "image"}] * n_images + items
    return render_chat(tokenizer, messages) + ANSWER_PREFIX


def chat_prompt(tokenizer: Tokenizer, system: str, dialogue: list[dict], n_images: int = 0) -> str:
    """The dialogue as chat turns (speaker = user, listener = assistant) after `system`; with
    `n_images` the last speaker turn starts with that many image items (see teacher_prompt)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for turn in dialogue:
        role = "user" if turn["role"] == "speaker" else "assistant"
        messages.append({"role": role, "content": turn["text"]})
    if n_images:
        items = [{"type": "text", "text": messages[-1]["content"]}]
        messages[-1]["content"] = [{"type": "image"}] * n_images + items
    return render_chat(tokenizer, messages)


def student_prompt(tokenizer: Tokenizer, dialogue: list[dict]) -> str:
    """The student's input: the dialogue as chat turns, nothing else."""
    return chat_prompt(tokenizer, STUDENT_SYSTEM, dialogue)


def reply_prompt(
    tokenizer: Tokenizer, dialogue: list[dict], analysis: TeacherAnalysis, n_images: int = 0
) -> str:
    """The teacher's reply turn: the plain chat turn with the analysis's Feelings step in the
    system message (see REPLY_SYSTEM), then the dialogue as chat turns; the reply is the model's
    next chat turn. A vision-language teacher (`tokenizer` its processor) sees the media again."""
    system = (
        REPLY_SYSTEM.format(feelings=analysis.feelings) if analysis.feelings else STUDENT_SYSTEM
    )
    return chat_prompt(tokenizer, system, dialogue, n_images)


@dataclass
class TeacherAnalysis:
    emotion: str | None  # one lower-case word, or None
    reasoning: str  # "Emotion: ...\nFeelings: ...\nSituation: ..." as the teacher wrote it
    parse_ok: bool  # the emotion and a feelings or situation step are there
    feelings: str = ""  # the Feelings step's text, what the reply turn is conditioned on


def parse_analysis(generated: str) -> TeacherAnalysis:
    """The analysis turn's answer (the text generated after ANSWER_PREFIX): the emotion word and
    the reasoning up to any reply the teacher started anyway. parse_ok needs the emotion and at
    least one of the feelings and situation steps."""
    full = ANSWER_PREFIX + generated
    marks = [(m.group(1).capitalize(), m.start(), m.end()) for m in _FIELD_RE.finditer(full)]
    replies = [start for name, start, _ in marks if name == "Reply"]
    reasoning = full[: replies[0]] if replies else full
    steps = [name for name, start, _ in marks if not replies or start < replies[0]]
    emotion = parse_teacher_output(generated).emotion
    ok = emotion is not None and bool({"Feelings", "Situation"} & set(steps))
    # A step's text runs to the next field marker; a Feelings field after a reply the teacher
    # started anyway is not part of the analysis.
    ends = [start for _, start, _ in marks[1:]] + [len(full)]
    feelings = next(
        (
            full[end:stop].strip()
            for (name, start, end), stop in zip(marks, ends, strict=True)
            if name == "Feelings" and (not replies or start < replies[0])
        ),
        "",
    )
    return TeacherAnalysis(emotion, reasoning.strip(), ok, feelings)


_ROLE_LEAD = re.compile(r"^[ \t]*\**[ \t]*(reply|listener|response)[ \t]*\**[ \t]*:[ \t]*\**", re.I)


def parse_reply(generated: str) -> TeacherOutput:
    """The reply turn's answer: all of it, less a leading "Reply:"/"Listener:" label."""
    m = _ROLE_LEAD.match(generated)
    start = m.end() if m else 0
    body = generated[start:]
    first = start + len(body) - len(body.lstrip())
    reply = body.strip()
    return TeacherOutput(None, "", reply, first, first + len(reply), True)


@dataclass
class TeacherOutput:
    emotion: str | None  # one lower-case word, or None
    reasoning: str  # "Emotion: ...\nFeelings: ...\nSituation: ..." as the teacher wrote it
    reply: str
    reply_start: int  # character span of the reply inside the generated text
    reply_end: int
    parse_ok: bool  # False: the format was not followed; reply is a best-effort fallback


def parse_teacher_output(generated: str) -> TeacherOutput:
    """Split the teacher's answer (the text generated after ANSWER_PREFIX) into its parts.

    Fallback when there is no usable "Reply:" field: everything after the first line is taken as
    the reply (the first line is the primed emotion; a one-line answer, with any line ending
    after it, is all reply; a lone emotion word is no reply), and parse_ok is False, which the
    quality gate's `unparsed` check acts on. Nothing is silently discarded.
    """
    full = ANSWER_PREFIX + generated
    offset = len(ANSWER_PREFIX)  # positions in `full` minus this = positions in `generated`
    marks = [(m.group(1).capitalize(), m.start(), m.end()) for m in _FIELD_RE.finditer(full)]
    emotion = None
    if marks and marks[0][0] == "Emotion":
        end = marks[1][1] if len(marks) > 1 else len(full)
        first_line = full[marks[0][2] : end].split("\n", 1)[0]
        words = re.findall(r"[A-Za-z]+", first_line)
        emotion = words[0].lower() if words else None
    reply_marks = [m for m in marks if m[0] == "Reply"]
    if reply_marks:
        _, start, end = reply_marks[0]
        # The reply runs to the next field marker, if the teacher starts the format over.
        later = [m[1] for m in marks if m[1] > start]
        stop = later[0] if later else len(full)
        body = full[end:stop]
        lead = len(body) - len(body.lstrip())
        reply = body.strip()
        if reply:
            first = end + lead - offset
            reasoning = full[:start].strip()
            return TeacherOutput(emotion, reasoning, reply, first, first + len(reply), True)
    # Fallback: the first line is the primed emotion and the rest the reply; a one-line answer
    # (whatever whitespace or line ending follows it) that ignored the format is all reply,
    # unless that one line is just the emotion word ("Emotion: sad": no reply at all).
    newline = full.find("\n")
    start = newline + 1 if newline >= 0 else len(full)
    if not full[start:].strip():
        line = full[offset:start]
        if len(re.findall(r"[A-Za-z']+", line)) > 1:
            start, emotion = offset, None
    body = full[start:]
    lead = len(body) - len(body.lstrip())
    first = max(start + lead - offset, 0)
    reply = body.strip()
    return TeacherOutput(emotion, full[:start].strip(), reply, first, first + len(reply), False)


# --- targeted empathy improvement (Xie et al.; the prompts are this project's own) -------------
# The teacher rewrites a base reply (the dataset's own, or its own first answer). Its answer is
# primed with IMPROVED_PREFIX; "weakest" first names the dimension it will improve.

IMPROVE_SYSTEM = (
    "You are an expert in empathetic communication. Empathy has three dimensions: cognitive "
    "(understanding the speaker's point of view and situation), affective (recognising and "
    "sharing their feelings) and compassionate (caring about them and offering support). "
    "You rewrite replies so they are more empathetic, short and natural."
)

DIMENSIONS = {
    "cognitive": "show that you understand the speaker's situation and point of view",
    "affective": "recognise and reflect the speaker's feelings",
    "compassionate": "show care and offer support or help",
}

IMPROVE_TASKS = {
    "plain": "Improve this reply.",
    "all": (
        "Rewrite the reply so it is empathetic in all three dimensions at once: "
        + "; ".join(f"{d}: {what}" for d, what in DIMENSIONS.items())
        + "."
    ),
    "weakest": (
        "Decide which empathy dimension (cognitive, affective or compassionate) the reply shows "
        "least, then rewrite the reply to improve that dimension. Answer as:\n"
        "Weakest: <dimension>\nImproved reply: <the rewritten reply>"
    ),
    "named": "Rewrite the reply to improve its {dimension} empathy: {what}.",
}
SEQUENCE = ("cognitive", "affective", "compassionate")  # "sequential": one turn each
SEQUENCE_TASK = "Now rewrite your last reply to improve its {dimension} empathy: {what}."

IMPROVE_USER = """Conversation:
{dialogue}

Reply to improve: {reply}

{task}"""

IMPROVED_PREFIX = "Improved reply:"
# After the primed prefix the teacher often starts with a blank line, which is the stop string:
# 22 of 24 demo rewrites came out empty. The stop strings apply only after this many tokens.
IMPROVE_MIN_TOKENS = 4
WEAKEST_PREFIX = "Weakest:"
_IMPROVED_RE = re.compile(r"^[ \t]*\**[ \t]*Improved reply[ \t]*\**[ \t]*:[ \t]*\**", re.I | re.M)
# A first line that announces the rewrite instead of being it ("Awesome! Here's a rewritten
# version with empathy in all three dimensions:"): not part of the reply. When nothing follows
# it, the reply is empty and the gate's `empty` check sends the example back.
_PREAMBLE_RE = re.compile(
    r"^[^\n]*?\b(?:here(?:'s| is| are)|below is)\b[^\n:]*?"
    r"\b(?:rewrit\w*|revis\w*|improv\w*|version|response|reply)\b[^\n:]*:[ \t]*",
    re.I,
)


def improve_task(strategy: str, dimension: str, turn: int = 0) -> str:
    """The instruction of one turn: turn 0 for every strategy, turns 1-2 for "sequential"."""
    if strategy == "sequential":
        d = SEQUENCE[turn]
        return (
            IMPROVE_TASKS["named"].format(dimension=d, what=DIMENSIONS[d])
            if turn == 0
            else (SEQUENCE_TASK.format(dimension=d, what=DIMENSIONS[d]))
        )
    task = IMPROVE_TASKS[strategy]
    return (
        task.format(dimension=dimension, what=DIMENSIONS[dimension])
        if strategy == "named"
        else task
    )


def improve_turns(strategy: str) -> int:
    return len(SEQUENCE) if strategy == "sequential" else 1


def improve_prompt(
    tokenizer: Tokenizer,
    dialogue: list[dict],
    base: str,
    strategy: str,
    dimension: str,
    earlier: list[str],
) -> str:
    """The improvement prompt for turn len(earlier): the chat so far, answer primed.

    `earlier` holds the teacher's improved replies of the previous turns ("sequential" only), so
    the last turn is conditioned on exactly the exchange the teacher had."""
    first = IMPROVE_USER.format(
        dialogue=render_dialogue(dialogue),
        reply=base.strip(),
        task=improve_task(strategy, dimension),
    )
    messages = [{"role": "system", "content": IMPROVE_SYSTEM}, {"role": "user", "content": first}]
    for turn, reply in enumerate(earlier, start=1):
        messages.append({"role": "assistant", "content": f"{IMPROVED_PREFIX} {reply}"})
        messages.append({"role": "user", "content": improve_task(strategy, dimension, turn)})
    text = render_chat(tokenizer, messages)
    return text + (WEAKEST_PREFIX if strategy == "weakest" else IMPROVED_PREFIX)


def improve_template_text() -> dict[str, Any]:
    return {
        "system": IMPROVE_SYSTEM,
        "user": IMPROVE_USER,
        "tasks": IMPROVE_TASKS,
        "dimensions": DIMENSIONS,
        "sequence_task": SEQUENCE_TASK,
        "prefixes": [IMPROVED_PREFIX, WEAKEST_PREFIX],
        "stop": STOP,
        "min_tokens": IMPROVE_MIN_TOKENS,
    }


def parse_improved_output(generated: str, strategy: str) -> TeacherOutput:
    """Split an improvement answer (the text generated after the primed prefix).

    For "weakest" the first line names the dimension (kept as reasoning) and the reply follows an
    "Improved reply:" marker; otherwise the whole answer is the reply, less a first line that
    only announces it ("Here's a revised response:"). Without the marker the weakest answer
    falls back to everything after the first line, flagged parse_ok=False."""
    if strategy != "weakest":
        m = _PREAMBLE_RE.match(generated.lstrip())
        start = len(generated) - len(generated.lstrip()) + (m.end() if m else 0)
        body = generated[start:]
        lead = start + len(body) - len(body.lstrip())
        reply = body.strip()
        return TeacherOutput(None, "", reply, lead, lead + len(reply), bool(reply))
    m = _IMPROVED_RE.search(generated)
    if m:
        body = generated[m.end() :]
        lead = len(body) - len(body.lstrip())
        reply = body.strip()
        reasoning = WEAKEST_PREFIX + generated[: m.start()].rstrip()
        start = m.end() + lead
        return TeacherOutput(None, reasoning, reply, start, start + len(reply), bool(reply))
    newline = generated.find("\n")
    start = newline + 1 if newline >= 0 else 0
    body = generated[start:]
    lead = len(body) - len(body.lstrip())
    reply = body.strip()
    reasoning = WEAKEST_PREFIX + generated[:start].rstrip()
    return TeacherOutput(None, reasoning, reply, start + lead, start + lead + len(reply), False)
