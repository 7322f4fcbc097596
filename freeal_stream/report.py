"""`freeal-stream report`: what a job did and how good its labels look, as one self-contained HTML file.

Everything is inlined (CSS, and the plots as SVG drawn by matplotlib), so the file opens offline, can be mailed
and archived, and loads nothing from the network. Figures come from the state file only: the rounds' stored
metrics, the label of record (human labels first) and the quarantine table; the same numbers `status` shows.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freeal_stream.config import JobConfig
from freeal_stream.status import job_status

BINS = 20  # confidence histogram bins over [0, 1]
DISPUTED_SHOWN = 25  # disputed rows listed
PROBLEMS_SHOWN = 20  # quarantined / flagged rows listed
SOURCES = ("human", "llm", "slm", "none")
COLOURS = {"human": "#7b3294", "llm": "#1f77b4", "slm": "#ff7f0e", "none": "#bbbbbb"}
PLOTS = ("rounds", "accuracy", "sources", "confidence")  # the figure ids, in page order


@dataclass(frozen=True)
class ReportData:
    """What the report shows, read from the state in one go."""

    status: dict[str, Any]  # job_status: spend, label sources, rounds, quarantine, review
    class_names: list[str]
    by_class_source: list[tuple[int | None, str, int]]
    confidence: list[tuple[str, int, int]]  # (source kind, bin, items)
    disputed: list[tuple[Any, ...]]
    gold: tuple[int, int]  # (items with gold, of which right)
    priced: bool

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return [r["metrics"] for r in self.status["rounds"] if r.get("metrics")]


def gather(store: Any, job: JobConfig, class_names: Sequence[str]) -> ReportData:
    rule = job.freeal.label_of_record
    status = job_status(store, job)
    return ReportData(
        status,
        list(class_names),
        store.labels_by_class_and_source(rule),
        store.confidence_histogram(rule, BINS),
        store.disputed_examples(rule, DISPUTED_SHOWN),
        store.gold_agreement(class_names, rule),
        bool(status["spent"]["priced"]),
    )


def write_report(store: Any, job: JobConfig, class_names: Sequence[str], out: Path) -> None:
    """Write the report to `out` (atomically: a reader never sees half a file)."""
    page = render(gather(store, job, class_names))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)


# ---- numbers ----------------------------------------------------------------------------------------------
def estimate(m: dict[str, Any]) -> tuple[float, float | None, float | None] | None:
    """A round's estimated export accuracy (value, low, high), if its metrics carry one: a number under
    `estimated_accuracy` (interval under `estimated_accuracy_low/_high` or `_interval`), or a dict there with
    `value`/`estimate` and `low`/`high` or `interval`."""
    e = m.get("estimated_accuracy")
    if e is None:
        return None
    if isinstance(e, dict):
        value = e.get("value", e.get("estimate"))
        lo, hi = e.get("low"), e.get("high")
        if lo is None and isinstance(e.get("interval"), (list, tuple)):
            lo, hi = e["interval"]
    else:
        value = e
        lo, hi = m.get("estimated_accuracy_low"), m.get("estimated_accuracy_high")
        if lo is None and isinstance(m.get("estimated_accuracy_interval"), (list, tuple)):
            lo, hi = m["estimated_accuracy_interval"]
    if not isinstance(value, (int, float)):
        return None
    return float(value), None if lo is None else float(lo), None if hi is None else float(hi)


def cached_share(m: dict[str, Any]) -> float:
    prompt = m.get("prompt_tokens_round") or 0
    return (m.get("cached_tokens_round") or 0) / prompt if prompt else 0.0


def spend_axis(data: ReportData) -> tuple[str, str]:
    """(metrics key, axis label) of the spend the accuracy plot runs against: cost when priced, else requests."""
    return ("cost_total", "cost so far") if data.priced else ("requests_total", "LLM requests so far")


# ---- plots ------------------------------------------------------------------------------------------------
def _figure(w: float, h: float, rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _svg(fig: Any) -> str:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # counts and rounds are whole numbers (a twin axis of fractions keeps its own ticks)
        if ax.get_ylabel() not in ("accuracy", "cost so far") and ax.get_ylim()[1] > 1.5:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_rounds(data: ReportData) -> str:
    """Per round: the LLM's labels, the SLM, the spend and the prompt tokens served from the server's cache."""
    fig, axes = _figure(10, 6.4, 2, 2)
    (a_llm, a_slm), (a_spend, a_cache) = axes
    rounds = data.rounds
    if not rounds:
        for ax in axes.flat:
            _empty(ax, "no round has finished yet")
        return _svg(fig)
    x = [m["round"] for m in rounds]
    bottom = [0] * len(x)
    for key, name, colour in (
        ("llm_labelled", "labelled", "#1f77b4"),
        ("llm_no_label", "no usable label", "#aaaaaa"),
        ("llm_failed", "failed", "#d62728"),
    ):
        ys = [m.get(key, 0) for m in rounds]
        a_llm.bar(x, ys, bottom=bottom, color=colour, label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    a_llm.set_title("LLM labels per round")
    a_llm.legend(fontsize=8)
    a_slm.bar(x, [m.get("clean_set", 0) for m in rounds], color="#ff7f0e", label="clean set")
    a_slm.bar(x, [m.get("human_labels", 0) for m in rounds], color=COLOURS["human"], width=0.4, label="human labels")
    a_slm.set_title("SLM: clean labelled rows (and human labels) per round")
    a_slm.set_xticks(x, [f"{r}\n{m.get('slm_mode') or ''}" for r, m in zip(x, rounds)])
    a_slm.legend(fontsize=8, loc="upper left")
    if any(m.get("slm_acc") is not None for m in rounds):
        twin = a_slm.twinx()
        twin.plot(x, [m.get("slm_acc") for m in rounds], "o-", color="#2ca02c", label="SLM accuracy (gold)")
        twin.set_ylim(0, 1)
        twin.legend(fontsize=8, loc="lower right")
    a_spend.bar(x, [m.get("requests_round", 0) for m in rounds], color="#8c564b", label="requests")
    a_spend.set_title("spend per round")
    a_spend.set_ylabel("requests")
    twin = a_spend.twinx()
    key, label = ("cost_total", "cost so far") if data.priced else ("prompt_tokens_total", "prompt tokens so far")
    twin.plot(x, [m.get(key, 0) for m in rounds], "o-", color="#17becf", label=label)
    twin.set_ylabel(label)
    twin.set_ylim(bottom=0)
    a_cache.bar(x, [100 * cached_share(m) for m in rounds], color="#9467bd")
    a_cache.set_ylim(0, 100)
    a_cache.set_title("prompt tokens from the server's prefix cache (%)")
    for ax in axes.flat:
        ax.set_xlabel("round")
        if ax is not a_slm:
            ax.set_xticks(x)
    return _svg(fig)


def plot_accuracy(data: ReportData) -> str:
    """Estimated export accuracy (with its interval) against spend, and where there is gold the true figures."""
    fig, axes = _figure(10, 4.2)
    ax = axes[0, 0]
    rounds = data.rounds
    key, xlabel = spend_axis(data)
    xs = [m.get(key, 0) for m in rounds]
    est = [estimate(m) for m in rounds]
    shown = False
    if any(e is not None for e in est):
        pts = [(x, e) for x, e in zip(xs, est) if e is not None]
        ax.plot([x for x, _ in pts], [e[0] for _, e in pts], "o-", color="#000000", label="estimated export accuracy")
        band = [(x, e[1], e[2]) for x, e in pts if e[1] is not None and e[2] is not None]
        if band:
            ax.fill_between(
                [b[0] for b in band],
                [b[1] for b in band],
                [b[2] for b in band],
                color="#000000",
                alpha=0.12,
                label="95% interval",
            )
        shown = True
    for mkey, name, colour in (
        ("llm_label_acc", "LLM labels vs gold", "#1f77b4"),
        ("slm_acc", "SLM vs gold", "#ff7f0e"),
    ):
        pts = [(x, m[mkey]) for x, m in zip(xs, rounds) if m.get(mkey) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color=colour, label=name)
            shown = True
    last = xs[-1] if xs else 0
    n_gold, right = data.gold
    if n_gold:
        ax.plot([last], [right / n_gold], "*", markersize=14, color="#2ca02c", label=f"export vs gold ({n_gold} items)")
        shown = True
    review = data.status.get("human_review")
    if review and review["random"]["reviewed"]:
        r = review["random"]
        lo, hi = r["interval_95"]
        ax.errorbar(
            [last],
            [r["accuracy"]],
            yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]],
            fmt="D",
            color=COLOURS["human"],
            capsize=5,
            label=f"human check, {r['reviewed']} random rows",
        )
        shown = True
    if not shown:
        _empty(ax, "no accuracy figure yet: not estimated, no gold, no human review")
        return _svg(fig)
    if not any(e is not None for e in est):
        ax.text(
            0.01,
            0.03,
            "export accuracy: not estimated (the rounds store no estimate)",
            transform=ax.transAxes,
            fontsize=8,
            color="#555555",
        )
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, max(last, 1e-9) * 1.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy against spend")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _svg(fig)


def plot_sources(data: ReportData) -> str:
    """How many labels of record each class has, and from which source."""
    names = [*data.class_names, "(no label)"]
    counts = {(c if c is not None else len(data.class_names), src): n for c, src, n in data.by_class_source}
    fig, axes = _figure(10, 0.5 + 0.42 * len(names))
    ax = axes[0, 0]
    if not counts:
        _empty(ax, "no items yet")
        return _svg(fig)
    left = [0] * len(names)
    for src in SOURCES:
        ys = [counts.get((k, src), 0) for k in range(len(names))]
        if any(ys):
            ax.barh(range(len(names)), ys, left=left, color=COLOURS[src], label=src)
            left = [a + b for a, b in zip(left, ys)]
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("items")
    ax.set_title("labels of record by class and source")
    ax.legend(fontsize=8, loc="lower right")
    return _svg(fig)


def plot_confidence(data: ReportData) -> str:
    """Histograms of the label of record's confidence, one per source (LLM: from logprobs; SLM: its softmax)."""
    kinds = [s for s in ("llm", "slm") if any(k == s for k, _, _ in data.confidence)]  # a human's is always 1
    fig, axes = _figure(10, 3.2, 1, max(1, len(kinds)))
    if not kinds:
        _empty(axes[0, 0], "no confidence stored (no logprobs from the LLM, no SLM round yet)")
        return _svg(fig)
    edges = [b / BINS for b in range(BINS)]
    for ax, kind in zip(axes.flat, kinds):
        per_bin = dict.fromkeys(range(BINS), 0)
        for k, b, n in data.confidence:
            if k == kind:
                per_bin[b] += n
        ax.bar(edges, [per_bin[b] for b in range(BINS)], width=1 / BINS, align="edge", color=COLOURS[kind])
        ax.set_xlim(0, 1)
        ax.set_title(f"{kind}: {sum(per_bin.values())} labels")
        ax.set_xlabel("confidence")
    axes[0, 0].set_ylabel("items")
    return _svg(fig)


# ---- the page ---------------------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1060px;
       color: #222; background: #fff; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.summary { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 8px; }
.card { background: #f5f6f8; border-radius: 6px; padding: 8px 12px; }
.card b { display: block; font-size: 20px; }
figure.plot { margin: 12px 0; } figure.plot svg { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: 13px; width: 100%; } td, th { border: 1px solid #ddd; padding: 3px 6px; }
th { background: #f0f0f0; text-align: left; } td.num { text-align: right; } .muted { color: #666; font-size: 13px; }
td.text { max-width: 520px; }
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(head)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if num else "text"}">{_e(v)}</td>' for v, num in zip(r, numeric)) + "</tr>"
        for r in rows
    )
    return "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + f"</tr>{body}</table>"


def _figure_html(name: str, svg: str, caption: str) -> str:
    return f'<figure class="plot" id="plot-{name}">{svg}<figcaption class="muted">{_e(caption)}</figcaption></figure>'


def _estimate_text(m: dict[str, Any]) -> str:
    e = estimate(m)
    return "not estimated" if e is None else _pct(e[0])


def _cards(data: ReportData) -> list[tuple[str, str]]:
    """The headline figures at the top of the page."""
    st, spent = data.status, data.status["spent"]
    n_gold, right = data.gold
    est = next((estimate(m) for m in reversed(data.rounds) if estimate(m) is not None), None)
    est_text = (
        "not estimated"
        if est is None
        else _pct(est[0]) + ("" if est[1] is None or est[2] is None else f" [{_pct(est[1])}, {_pct(est[2])}]")
    )
    rnd = (st.get("human_review") or {}).get("random") or {}
    return [
        ("items", f"{st['items']:,}"),
        ("labels by source", ", ".join(f"{k} {v:,}" for k, v in sorted(st["labels_by_source"].items()))),
        ("LLM requests / tokens", f"{spent['requests']:,} / {spent['tokens']:,}"),
        ("cost", f"{spent['cost']:.4f}" if data.priced else "not priced (no budget.prices)"),
        ("estimated export accuracy", est_text),
        ("export vs gold", f"{_pct(right / n_gold)} on {n_gold:,}" if n_gold else "no gold in the data"),
        (
            "human check (random rows)",
            f"{_pct(rnd['accuracy'])} on {rnd['reviewed']}"
            if rnd.get("reviewed")
            else "no randomly drawn row reviewed",
        ),
        ("LLM labels the SLM disputes", f"{st['llm_labels_disputed']:,} (rule: {st['label_of_record']})"),
    ]


def render(data: ReportData) -> str:
    st = data.status
    names = data.class_names
    cls = lambda i: "-" if i is None else names[i]
    cards = _cards(data)
    round_rows = [
        (
            m["round"],
            m.get("slm_mode"),
            m.get("llm_labelled"),
            m.get("llm_no_label"),
            m.get("llm_failed"),
            m.get("requests_round"),
            m.get("prompt_tokens_round", 0) + m.get("completion_tokens_round", 0),
            _pct(cached_share(m)),
            f"{m.get('cost_total', 0):.4f}" if data.priced else "-",
            _pct(m.get("llm_label_acc")),
            _pct(m.get("slm_acc")),
            _estimate_text(m),
            m.get("human_labels", 0),
        )
        for m in data.rounds
    ]
    disputed = [
        (i, t[:300], cls(lab), src, "-" if c is None else f"{c:.2f}", cls(ll), cls(sl))
        for i, t, lab, src, c, ll, sl in data.disputed
    ]
    q = st["quarantine"]
    parts = [
        f"<h1>freeal-stream report: {_e(st['job'])}</h1>",
        '<div class="summary">'
        + "".join(f'<div class="card">{_e(k)}<b>{_e(v)}</b></div>' for k, v in cards)
        + "</div>",
        "<h2>Rounds</h2>",
        _figure_html(
            "rounds",
            plot_rounds(data),
            "LLM labels, the SLM's clean set, spend and prompt-cache share "
            "per round (from the metrics stored with each round).",
        ),
        _table(
            [
                "round",
                "SLM",
                "LLM labelled",
                "no label",
                "failed",
                "requests",
                "tokens",
                "cached",
                "cost so far",
                "LLM acc (gold)",
                "SLM acc (gold)",
                "est. accuracy",
                "human labels",
            ],
            round_rows,
            [True] * 13,
        )
        if round_rows
        else '<p class="muted">no round has finished yet</p>',
        "<h2>Accuracy against spend</h2>",
        _figure_html(
            "accuracy",
            plot_accuracy(data),
            "Estimated export accuracy where the rounds store one; the "
            "gold figures only where the data has a gold column; the human check on rows drawn at random.",
        ),
        "<h2>Labels by source</h2>",
        _figure_html(
            "sources",
            plot_sources(data),
            "The label of record per class: human (review import), LLM, "
            "or SLM (texts the LLM never labelled, and disputed ones under label_of_record: slm).",
        ),
        "<h2>Confidence</h2>",
        _figure_html(
            "confidence",
            plot_confidence(data),
            "LLM confidence comes from logprobs (absent when the "
            "endpoint gives none), the SLM's from its softmax; human labels (confidence 1) are left out.",
        ),
        "<h2>Human review</h2>",
        _review_html(st.get("human_review")),
        f"<h2>Disputed examples ({st['llm_labels_disputed']:,} in all, least confident first)</h2>",
        _table(["id", "text", "label of record", "source", "confidence", "LLM label", "SLM label"], disputed)
        if disputed
        else '<p class="muted">no LLM label is disputed</p>',
        "<h2>Bad input</h2>",
        _quarantine_html(q),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>freeal-stream report: {_e(st['job'])}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def _review_html(review: dict[str, Any] | None) -> str:
    if not review:
        return (
            '<p class="muted">No human label yet. <code>freeal-stream review export JOB</code> picks the rows '
            "worth a look; <code>review import</code> reads the labels back.</p>"
        )
    rows = [(r["reason"], r["reviewed"], r["agreed"], _pct(r["agreed"] / r["reviewed"])) for r in review["by_reason"]]
    rnd = review["random"]
    note = (
        f"On the {rnd['reviewed']} rows drawn at random the models' label was right {_pct(rnd['accuracy'])} of the "
        f"time (95% interval {_pct(rnd['interval_95'][0])} to {_pct(rnd['interval_95'][1])}): an unbiased check of "
        "the export's accuracy."
        if rnd["reviewed"]
        else "No reviewed row was drawn at random, so there is no unbiased check yet."
    )
    return (
        _table(["why the row was picked", "reviewed", "models' label right", "share"], rows, [False, True, True, True])
        + f'<p class="muted">{_e(note)} The other rows were picked where the models are weakest, so their '
        "share understates accuracy.</p>"
    )


def _quarantine_html(q: dict[str, Any]) -> str:
    if not q["by_reason"]:
        return '<p class="muted">no row quarantined or flagged</p>'
    counts = _table(
        ["action", "reason", "rows"],
        [(c["action"], c["reason"], c["count"]) for c in q["by_reason"]],
        [False, False, True],
    )
    shown = q["rows"][:PROBLEMS_SHOWN]
    rows = _table(
        ["source", "where", "action", "reason", "detail"],
        [(r["source"], r["location"], r["action"], r["reason"], r["detail"]) for r in shown],
    )
    more = q["quarantined"] + q["flagged"] - len(shown)
    tail = f'<p class="muted">{more} more: <code>freeal-stream quarantine JOB</code> lists them all.</p>'
    return counts + "<p></p>" + rows + (tail if more else "")
