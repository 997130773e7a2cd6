"""The teacher-output quality gate: a reply is checked like any other input before it is cached.

    problems = check_reply(reply, quality, parse_ok=..., finish_reason=..., privileged=...)

Each check returns a short reason when the reply fails it; `teacher_cache` then retries the
example (a fresh, seeded sample), rejects it, or keeps it with a flag, as the check's policy in
`teacher_cache.quality` says. The checks, exactly:

- `empty`: the reply has fewer than `min_words` words (a word: a run of letters, digits or
  apostrophes). No reply at all is the extreme case.
- `repetition`: the same sentence twice (sentences split after . ! ? or a line break, compared
  lower-cased with punctuation dropped), the same clause of 3+ words twice (clauses: sentences
  split again at , ; :), or a word n-gram loop: some `loop_ngram` consecutive words occur
  `loop_count` or more times.
- `refusal`: the reply refuses or talks about itself as an assistant instead of answering
  ("as an AI", "as a language model", "I'm unable to provide", "I'm not capable of", "I'm
  designed to", "I cannot assist"): a student should not learn to decline a person in distress.
- `echo`: the reply repeats `echo_ngram` consecutive words of the speaker's turns back at them
  ("I'm so angry, my landlord is selling the house so I have to move.").
- `truncated`: generation stopped at `max_new_tokens` (finish reason "length") and the reply does
  not end a sentence (its last character is not . ! ? or a closing quote/bracket after one).
- `unparsed`: the teacher did not follow the answer format (no "Reply:" field; in the improve
  mode's `weakest` strategy, no "Improved reply:").
- `leak`: the reply quotes the privileged notes: `leak_ngram` consecutive words of one note
  appear verbatim in the reply (compared as normalised words), and the dialogue does not say
  them too. The student never sees the notes, so such a reply would teach it to invent them.
- `generic`: the same normalised reply was already accepted `generic_max` times in this cache
  (earlier shards included): one text serving many contexts teaches a student one answer.
- `stock`: the reply's first `stock_words` words (normalised) already open at least `stock_min`
  of the replies accepted so far and at least `stock_share` of them. A stock opening ("I'm so
  sorry to ...") on a quarter of a cache is what a student learns first, and then loops on.
- `unchanged` (improve mode): the improved reply equals the reply it was asked to improve.

`check_prefix` runs the checks a reply's beginning can already fail (`EARLY`) on the reply as it
is being generated; `teacher_cache` stops the attempt there instead of generating the rest.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from empathy_distill.shared.config import QualityConfig

_WORD = re.compile(r"[A-Za-z0-9']+")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSE_SPLIT = re.compile(r"[,;:.!?\n]+")
_ENDS_SENTENCE = re.compile(r"[.!?…][\"')\]”’]*\s*$")
_PARTIAL_WORD = re.compile(r"[A-Za-z0-9']+$")

_REFUSAL = re.compile(
    r"\bas an? (?:ai|language model|assistant|language ai)\b|\bi(?:'m| am) (?:unable|not able) to "
    r"(?:provide|help|assist|answer)|\bi(?:'m| am) not (?:capable|equipped|designed)\b"
    r"|\bi(?:'m| am) designed to\b|\bi (?:cannot|can't|can not) (?:assist|help) with\b",
    re.I,
)

CHECKS = (
    "empty",
    "repetition",
    "refusal",
    "echo",
    "truncated",
    "unparsed",
    "leak",
    "generic",
    "stock",
    "unchanged",
)
# In an `accepted` Counter (the replies accepted so far, see `remember`): normalised replies are
# str keys; these tuple keys count their openings (first words) and all accepted replies. One
# Counter, so the Ray driver can merge and diff the workers' counts as it does any Counter.
OPENING = "opening"
TOTAL = ("replies",)
# The checks whose evidence only grows as a reply goes on (a repeated sentence stays repeated,
# an opening stays the opening, a quoted n-gram stays quoted): a beginning that fails one is a
# reply that fails it, so `check_prefix` can judge them before the reply ends.
EARLY = ("repetition", "refusal", "echo", "leak", "stock")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def normalise(text: str) -> str:
    """Lower-cased words joined by single spaces: what two replies are compared as."""
    return " ".join(words(text))


def sentences(text: str) -> list[str]:
    return [s for s in (normalise(p) for p in _SENTENCE_SPLIT.split(text or "")) if s]


def opening(text: str, n: int) -> str:
    """The first `n` words of `text`, normalised."""
    return " ".join(words(text)[:n])


def remember(accepted: Counter, reply: str, q: QualityConfig) -> None:
    """Count one accepted reply: its text (the `generic` check), its opening and the total (the
    `stock` check)."""
    accepted[normalise(reply)] += 1
    accepted[(OPENING, opening(reply, q.stock_words))] += 1
    accepted[TOTAL] += 1


def repeated_sentence(text: str) -> str | None:
    """The first sentence that occurs twice in `text` (normalised), or None."""
    seen: set[str] = set()
    for s in sentences(text):
        if s in seen:
            return s
        seen.add(s)
    return None


def repeated_clause(text: str, min_words: int = 3) -> str | None:
    """The first clause of at least `min_words` words that occurs twice, or None."""
    seen: set[str] = set()
    for clause in (normalise(c) for c in _CLAUSE_SPLIT.split(text or "")):
        if len(clause.split()) < min_words:
            continue
        if clause in seen:
            return clause
        seen.add(clause)
    return None


def ngram_loop(text: str, n: int, count: int) -> str | None:
    """An n-word sequence that occurs at least `count` times in `text`, or None."""
    w = words(text)
    grams = Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    if not grams:
        return None
    gram, times = grams.most_common(1)[0]
    return " ".join(gram) if times >= count else None


def _grams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def leaked_note(reply: str, privileged: dict[str, str], n: int, dialogue: str = "") -> str | None:
    """The name of the first privileged note that shares n consecutive words with the reply,
    words the dialogue does not also say (echoing the speaker is no leak)."""
    reply_grams = _grams(reply, n) - _grams(dialogue, n)
    for name, note in privileged.items():
        if reply_grams & _grams(note, n):
            return name
    return None


def speaker_text(dialogue: list[dict]) -> str:
    """The speaker's turns, one per line (what the `echo` check compares against)."""
    return "\n".join(t["text"] for t in dialogue if t["role"] == "speaker")


def check_reply(
    reply: str,
    q: QualityConfig,
    *,
    parse_ok: bool = True,
    finish_reason: str | None = "stop",
    privileged: dict[str, str] | None = None,
    dialogue: str = "",
    speaker: str = "",
    accepted: Counter | None = None,
    base: str | None = None,
    only: set[str] | None = None,
) -> list[tuple[str, str]]:
    """Every check `reply` fails, as (check, reason) pairs; checks whose policy is `off` are
    skipped. `dialogue` is the text the student does see (words it says are no leak); `speaker`
    the speaker's own turns (the `echo` check); `accepted` counts the replies already accepted
    (see `remember`: the `generic` and `stock` checks); `base` is the reply an improve-mode answer
    rewrote (the `unchanged` check); `only` limits the checks run to those named."""
    on = {c for c in CHECKS if q.policy(c) != "off" and (only is None or c in only)}
    found: list[tuple[str, str]] = []
    n_words = len(words(reply))
    if "empty" in on and n_words < q.min_words:
        found.append(("empty", f"empty or too short: {n_words} words (< {q.min_words})"))
    if "repetition" in on and n_words:
        found += _repetition(reply, reply, reply, q)
    if "refusal" in on and (m := _REFUSAL.search(reply or "")):
        found.append(("refusal", f"refuses or speaks as an assistant: {m.group(0)!r}"))
    if "echo" in on and speaker and _grams(reply, q.echo_ngram) & _grams(speaker, q.echo_ngram):
        found.append(("echo", f"repeats {q.echo_ngram}+ words of the speaker back"))
    if "truncated" in on and finish_reason == "length" and not _ENDS_SENTENCE.search(reply):
        found.append(("truncated", "cut off at max_new_tokens in mid-sentence"))
    if "unparsed" in on and not parse_ok:
        found.append(("unparsed", "the answer did not follow the format"))
    if "leak" in on and privileged:
        name = leaked_note(reply, privileged, q.leak_ngram, dialogue)
        if name is not None:
            found.append(("leak", f"quotes the private note {name!r} ({q.leak_ngram}+ words)"))
    if "generic" in on and accepted is not None and n_words:
        times = accepted.get(normalise(reply), 0)
        if times >= q.generic_max:
            found.append(("generic", f"the same reply was already accepted {times} times"))
    if "stock" in on and accepted is not None and n_words:
        first = opening(reply, q.stock_words)
        times, total = accepted.get((OPENING, first), 0), accepted.get(TOTAL, 0)
        if times >= q.stock_min and times >= q.stock_share * total:
            found.append(
                ("stock", f"opens like {times} of the {total} replies accepted: {first[:60]!r}")
            )
    if "unchanged" in on and base is not None and normalise(reply) == normalise(base):
        found.append(("unchanged", "the improved reply equals the reply it was to improve"))
    return found


def _repetition(sentences_text: str, clauses_text: str, words_text: str, q: QualityConfig):
    again = repeated_sentence(sentences_text)
    clause = repeated_clause(clauses_text)
    loop = ngram_loop(words_text, q.loop_ngram, q.loop_count)
    if again is not None:
        return [("repetition", f"repeats a sentence: {again[:60]!r}")]
    if clause is not None:
        return [("repetition", f"repeats a clause: {clause[:60]!r}")]
    if loop is not None:
        return [("repetition", f"loops {loop!r} {q.loop_count}+ times")]
    return []


def _upto_last(pattern: re.Pattern, text: str) -> str:
    """`text` up to its last match of `pattern`: the whole sentences (clauses) written so far."""
    end = 0
    for m in pattern.finditer(text):
        end = m.start()
    return text[:end]


def check_prefix(
    text: str,
    q: QualityConfig,
    *,
    privileged: dict[str, str] | None = None,
    dialogue: str = "",
    speaker: str = "",
    accepted: Counter | None = None,
) -> list[tuple[str, str]]:
    """The `EARLY` problems that a reply beginning with `text` is sure to have, whatever is
    generated next; only checks whose policy stops the reply (`retry`, `reject`) are run. Each
    check reads only the part of `text` no later token can change: whole words (the last one may
    still grow), and for repeated sentences and clauses, whole sentences and clauses (the last
    one may still go on: "I'm so sorry. I'm so sorry" may end "... to hear that.")."""
    stops = {c for c in EARLY if q.policy(c) in ("retry", "reject")}
    whole = _PARTIAL_WORD.sub("", text or "")
    found = check_reply(
        whole,
        q,
        privileged=privileged,
        dialogue=dialogue,
        speaker=speaker,
        only=stops & {"refusal", "echo", "leak"},
    )
    if "repetition" in stops:
        found += _repetition(
            _upto_last(_SENTENCE_SPLIT, text), _upto_last(_CLAUSE_SPLIT, text), whole, q
        )
    if "stock" in stops and accepted is not None and len(words(whole)) >= q.stock_words:
        found += check_reply(whole, q, accepted=accepted, only={"stock"})
    return found


def verdict(found: Iterable[tuple[str, str]], q: QualityConfig) -> str:
    """`retry` (or `reject` on the last attempt), `reject` or `accept`; `flag` problems accept."""
    policies = {q.policy(check) for check, _ in found}
    if "retry" in policies:
        return "retry"
    if "reject" in policies:
        return "reject"
    return "accept"
