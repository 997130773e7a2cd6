"""report.md and PNG charts from the figures in metrics.json (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from empathy_distill.shared.files import atomic_write_text

QUALITY = (
    ("bertscore_f1", "BERTScore-F1"),
    ("emotion_accuracy", "emotion acc."),
    ("emotion_macro_f1", "emotion macro-F1"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
    ("distinct_1", "Distinct-1"),
    ("distinct_2", "Distinct-2"),
)


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cell(text: str | None) -> str:
    """Text safe inside a markdown table cell."""
    text = (text or "").replace("|", "\\|").replace("\r", "").strip()
    return text.replace("\n", "<br>") or "*(empty)*"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, m: dict[str, Any], examples, runs, n_examples: int) -> list[Path]:
    models = m["models"]
    charts = write_charts(out, m)
    baseline = m["baseline"]
    parts = [
        "# Evaluation report",
        f"Input: {', '.join(f'`{p}`' for p in m['input'])}: {m['examples']} dialogues evaluated "
        f"({m['examples_read']} read, {m['rejected']} rejected (see `rejects.jsonl`), "
        f"{m['other_split']} of other splits left out). Greedy "
        f"replies of at most {m['max_new_tokens']} tokens. Judge: `{m['judge']}`; "
        f"baseline: **{baseline}**.",
        "## Quality",
        table(
            ["model", *[label for _, label in QUALITY], "mean words", "empty"],
            [
                [f"**{name}**", *[fmt(r[key]) for key, _ in QUALITY]]
                + [fmt(r["mean_reply_words"], 1), str(r["empty_replies"])]
                for name, r in models.items()
            ],
        ),
        f"BLEU-4, ROUGE-L and BERTScore-F1 compare with the dataset's reply "
        f"({next(iter(models.values()))['with_reference']} dialogues have one). BERTScore: "
        f"{m['bertscore']}, so unrelated sentences still score well above 0. " + emotion_note(m),
        "## Teacher fidelity",
        fidelity_section(m),
        "## Through the teacher's quality gate",
        gate_section(models),
        f"## LLM judge: empathy against {baseline}",
        judge_section(m),
        "## Cost",
        table(
            [
                "model",
                "parameters",
                "weights (MiB)",
                "generated tokens",
                "tokens/s",
                "peak engine RSS (MiB)",
                "engine start (s)",
            ],
            [
                [
                    f"**{name}**",
                    f"{r['parameters'] / 1e6:.1f} M",
                    fmt(r["weights_mib"], 0),
                    str(r["generated_tokens"]),
                    fmt(r["tokens_per_second"], 1),
                    fmt(r["peak_engine_rss_mib"], 0),
                    fmt(r["engine_startup_seconds"], 1)
                    + (" (running engine)" if r.get("engine_reused") else ""),
                ]
                for name, r in models.items()
            ],
        ),
        "Tokens per second: reply tokens over the wall time of one batched generation of all "
        "replies (engine start excluded). Peak RSS: the summed resident memory of the engine's "
        "processes (engine core and workers), sampled every 0.25 s from engine start to the end of "
        "generation; it includes the KV-cache pages the engine touched "
        "(`kv_cache_memory_bytes`: the same budget for every model) and the runtime, not just "
        "the weights; pages shared between the processes count once per process. Engine start: "
        "a new engine's start, or, marked (running engine), for a model of the running engine's "
        "architecture, the load of its weights into that engine (`evaluate.reuse_engine`).",
        "## Charts",
        "\n".join(f"![{p.stem}]({p.name})" for p in charts),
        "## Example replies",
        examples_section(examples, runs, n_examples),
    ]
    atomic_write_text(out / "report.md", "\n\n".join(parts) + "\n")
    return charts


def fidelity_section(m: dict[str, Any]) -> str:
    models = m["models"]
    if not m.get("teacher_cache"):
        return (
            "Not measured: no held-out teacher cache (`evaluate.teacher_cache`: run `pipeline "
            "teacher-cache` on the held-out dialogues, and point it there)."
        )
    rows = [
        [
            f"**{name}**",
            fmt(f["kl_teacher_student"]),
            fmt(f["kl_student_teacher"]),
            fmt(f["reply_logprob"]),
            fmt(f["bertscore_f1_vs_teacher"]),
        ]
        for name, r in models.items()
        if (f := r["teacher_fidelity"])
    ]
    first = next(f for r in models.values() if (f := r["teacher_fidelity"]))
    return (
        table(
            [
                "model",
                "KL(teacher‖model)",
                "KL(model‖teacher)",
                "reply log-prob",
                "BERTScore vs teacher",
            ],
            rows,
        )
        + f"\n\nOn `{m['teacher_cache']}`: {first['replies']} held-out teacher replies, "
        f"{first['tokens']} tokens, each model reading the student prompt (no privileged notes) "
        "and the teacher's reply, teacher-forced. KL over the cached top-k plus the tail bucket "
        "(stage two's losses), nats per token, lower is closer; reply log-prob: the mean "
        "log-probability of the teacher's tokens, higher is closer; BERTScore-F1 of the "
        f"model's own greedy reply against the teacher's ({first['with_teacher_reply']} "
        "dialogues)."
    )


def emotion_note(m: dict[str, Any]) -> str:
    labels, first = m["emotion_labels"], next(iter(m["models"].values()))
    if not first["with_gold_emotion"]:
        return (
            f"Emotion: not scored, since no dialogue has a gold label among the "
            f"{len(labels)} labels of `evaluate.emotion_labels`."
        )
    return (
        f"Emotion: each model picks one of {len(labels)} labels after `Emotion:` under the "
        "reasoning prompt (no privileged notes; constrained decoding, greedy), scored on the "
        f"{first['with_gold_emotion']} dialogues whose gold label is one of them; macro-F1 "
        f"averages the per-label F1 (chance: about {1 / len(labels):.2f} accuracy). Confusions: "
        "`emotion.png`."
    )


def gate_section(models: dict[str, Any]) -> str:
    """The share of each model's replies that pass the teacher cache's quality gate, and the
    share failing each check (a reply may fail several)."""
    checks = sorted({c for r in models.values() for c in r["gate"] if c != "passed"})
    rows = [
        [
            f"**{name}**",
            fmt(r["gate"]["passed"], 2),
            *[fmt(r["gate"].get(c, 0.0), 2) for c in checks],
        ]
        for name, r in models.items()
    ]
    return (
        table(["model", "passed", *checks], rows)
        + "\n\nEach reply checked as `teacher-cache` checks a teacher reply "
        "(`teacher_cache.quality`: empty, repeated sentences or loops, cut off, generic, stock "
        "openings, ...), without retries: `generic` and `stock` compare a reply with the same "
        "model's earlier replies. A model that answers everyone alike, or loops, fails here "
        "whatever its BERTScore."
    )


def judge_section(m: dict[str, Any]) -> str:
    rows = []
    for name, r in m["models"].items():
        w = r["judge_vs_baseline"]
        if w is None:
            continue
        rows.append(
            [f"**{name}**", str(w["pairs"])]
            + [fmt(w[f"{k}_rate"], 2) for k in ("win", "tie", "loss")]
            + [fmt(w["debiased_win_rate"], 2), fmt(w["debiased_loss_rate"], 2)]
            + [str(w["unjudged"])]
        )
    text = (
        table(
            ["model", "pairs", "win", "tie", "loss", "debiased win", "debiased loss", "unjudged"],
            rows,
        )
        if rows
        else "Only one model: nothing to judge."
    )
    text += (
        "\n\nEach pair is asked twice with the replies swapped; a model wins only when the judge "
        "prefers its reply in both orders, a split verdict is a tie. The judge's choice is the "
        'more likely of its next tokens " A" and " B". *Debiased*: the sign of the reply\'s '
        "log-odds advantage log p(A) - log p(B) summed over both orders, in which a judge's fixed "
        "preference for one position cancels (a tie only when exactly equal).\n\n"
    )
    c = m["judge_check"]
    if c and c.get("pairs"):
        text += (
            f"**Judge check** (how far to trust the win rates): on {c['pairs']} pairs of rated "
            "replies whose human ratings differ, the judge sided with the people in "
            f"**{fmt(c['agreement'], 2)}** of its answers (chance 0.50); in both orders for "
            f"{fmt(c['agreement_both_orders'], 2)} of the pairs, against them in both orders for "
            f"{fmt(c['disagreement_both_orders'], 2)}. It picked the same reply in both orders "
            f'for {fmt(c["position_consistency"], 2)} of the pairs and answered "A" in '
            f"{fmt(c['picks_a_rate'], 2)} of its answers (0.50 = no position bias). By the "
            f"debiased log-odds it sides with the people on {fmt(c['debiased_agreement'], 2)} "
            "of the pairs (chance 0.50)."
        )
    else:
        text += f"**Judge check:** {m['judge_check_note'] or 'no rated pair could be judged'}."
    return text


def examples_section(examples, runs, n: int) -> str:
    blocks = []
    for i, ex in enumerate(examples[:n]):
        lines = [f"### {i + 1}. `{ex.example_id}` (gold emotion: {ex.emotion or 'n/a'})"]
        lines += [f"> **{t['role']}:** {t['text']}  " for t in ex.dialogue]
        lines.append("")
        rows = [["*reference*", cell(ex.reference), ""]]
        rows += [
            [f"**{name}**", cell(r["replies"][i]), r["emotions"][i] or ""]
            for name, r in runs.items()
        ]
        lines.append(table(["model", "reply", "named emotion"], rows))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) or "(none requested)"


# ----------------------------------------------------------------------------- charts


def write_charts(out: Path, m: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = m["models"]
    names = list(models)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [models[name][key] or 0.0 for key, _ in QUALITY]
        xs = [i + k * width for i in range(len(QUALITY))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(QUALITY))])
    ax.set_xticklabels([label for _, label in QUALITY])
    ax.set_ylim(0, 1)
    ax.set_title("Reply quality (higher is better)")
    ax.legend()
    paths.append(save(fig, out / "quality.png"))

    # One bar per verdict rule: both verdicts, and the sign of the debiased log-odds.
    fig, ax = plt.subplots(figsize=(8, 1.0 * (len(names) + 1) + 1.5))
    labels, rows = [], []
    for name in names:
        w = models[name]["judge_vs_baseline"]
        if w and w["pairs"]:
            labels += [name, f"{name}\n(debiased)"]
            rows.append([w["win_rate"], w["tie_rate"], w["loss_rate"]])
            win, loss = w["debiased_win_rate"], w["debiased_loss_rate"]
            rows.append([win, 1 - win - loss, loss])
    c = m["judge_check"]
    if c and c.get("pairs"):
        labels += ["judge check: sides\nwith people", "judge check\n(debiased)"]
        agree, against = c["agreement_both_orders"], c["disagreement_both_orders"]
        rows.append([agree, 1 - agree - against, against])
        rows.append([c["debiased_agreement"], 0.0, 1 - c["debiased_agreement"]])
    left = [0.0] * len(rows)
    for j, (part, color) in enumerate(
        zip(
            ("win / agrees", "tie / split", "loss / disagrees"),
            ("tab:green", "0.7", "tab:red"),
            strict=True,
        )
    ):
        values = [r[j] for r in rows]
        ax.barh(labels, values, left=left, color=color, label=part)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title(f"LLM judge, both orders: against {m['baseline']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    paths.append(save(fig, out / "win_rate.png"))

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    panels = (
        ("parameters (M)", lambda r: r["parameters"] / 1e6),
        ("generated tokens / s", lambda r: r["tokens_per_second"] or 0.0),
        ("peak engine RSS (MiB)", lambda r: r["peak_engine_rss_mib"] or 0.0),
    )
    for ax, (title, get) in zip(axes, panels, strict=True):
        ax.bar(names, [get(models[n]) for n in names], color="tab:blue")
        ax.set_title(title)
    fig.suptitle("Cost")
    paths.append(save(fig, out / "cost.png"))
    emotion = emotion_chart(plt, m, out / "emotion.png")
    return paths + ([emotion] if emotion else [])


def emotion_chart(plt, m: dict[str, Any], path: Path) -> Path | None:
    """One heat map per model: gold label (rows) against the label it picked (columns)."""
    models = {n: r for n, r in m["models"].items() if r["with_gold_emotion"]}
    if not models:
        return None
    seen = {g for r in models.values() for g in r["emotion_confusion"]}
    seen |= {p for r in models.values() for c in r["emotion_confusion"].values() for p in c}
    labels = [x for x in m["emotion_labels"] if x in seen] + sorted(seen - set(m["emotion_labels"]))
    size = 2.5 + 0.18 * len(labels)
    fig, axes = plt.subplots(1, len(models), figsize=(size * len(models), size), squeeze=False)
    for ax, (name, r) in zip(axes[0], models.items(), strict=True):
        grid = [[r["emotion_confusion"].get(g, {}).get(p, 0) for p in labels] for g in labels]
        ax.imshow(grid, cmap="Blues")
        ax.set_xticks(range(len(labels)), [x or "(none)" for x in labels], rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xlabel("picked")
        ax.set_ylabel("gold")
        acc = r["emotion_accuracy"]
        ax.set_title(f"{name}: accuracy {fmt(acc, 2)}", fontsize=9)
    return save(fig, path)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    tmp.replace(path)
    return path
