"""Render the analysis as the user's answer: Markdown + self-contained HTML, CSV tables and PNG plots.

The report opens with a verdict written from the numbers (which factor values escape the plateau, which do
not matter, which combinations are needed, where the seed configuration sits), never from fixed text.
Everything is rendered in memory first and each file is then written atomically (temp file + rename), so a
failure leaves the previous report intact instead of a half-written one. Plots use matplotlib's object API on
an Agg canvas: no pyplot, no global backend switch for whoever imports this module.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lstm_sweep import analysis
from lstm_sweep.files import write_atomic
from lstm_sweep.metrics import SKILL_FLOOR

PLOTS = ("escape_rate.png", "skill_vs_lr.png", "interaction.png", "curves.png")
MAX_INTERACTION_ROWS = 15
SIGNIFICANCE = 0.05  # F-test level below which the top interaction is reported as a needed combination
FAILED_COLUMNS = ["trial_number", "config_id", "error", "params", "retried"]


@dataclass(frozen=True)
class ReportFiles:
    """The files one `write_report` call wrote (iterable as the list of paths)."""

    out_dir: Path
    markdown: Path
    html: Path
    runs_csv: Path
    factors_csv: Path
    interactions_csv: Path
    plots: tuple[Path, ...]

    @property
    def paths(self) -> list[Path]:
        return [self.markdown, self.html, self.runs_csv, self.factors_csv, self.interactions_csv, *self.plots]

    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


# ----------------------------------------------------------------------------------------------------
# A tiny document model rendered twice (Markdown and HTML), so both say exactly the same thing


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame
    note: str = ""


@dataclass(frozen=True)
class Image:
    name: str
    alt: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


Block = str | Table | Image | Bullets


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


def _cell(value: Any) -> str:
    """Display text of one table cell: 3 significant digits, blanks for missing."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else f"{float(value):.3g}"
    return str(value)


def _pct(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.0%}"


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame.astype(str)
    return frame.apply(lambda col: col.map(_cell)).astype(str)


def _markdown_table(frame: pd.DataFrame) -> str:
    shown = _display(frame)
    header = "| " + " | ".join(str(c) for c in shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    rows = ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`(.+?)`")


def _inline_html(text: str) -> str:
    """The two inline marks the report text uses (**bold**, `code`), after escaping everything else."""
    return _CODE.sub(r"<code>\1</code>", _BOLD.sub(r"<strong>\1</strong>", html.escape(text)))


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    """The report as Markdown; images are referenced by file name (they sit next to report.md)."""
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, str):
                out += [block, ""]
            elif isinstance(block, Bullets):
                out += [*(f"- {item}" for item in block.items), ""]
            elif isinstance(block, Table):
                out += [_markdown_table(block.frame), ""]
                if block.note:
                    out += [f"_{block.note}_", ""]
            else:
                out += [f"![{block.alt}]({block.name})", ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
code { background: #f3f3f3; padding: 0 .2em; }
.note { color: #555; font-size: .9em; font-style: italic; }
"""


def render_html(title: str, sections: Sequence[Section], images: Mapping[str, bytes]) -> str:
    """Self-contained page: CSS inline, every image a base64 data URI, tables from DataFrame.to_html."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, str):
                out.append(f"<p>{_inline_html(block)}</p>")
            elif isinstance(block, Bullets):
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
            elif isinstance(block, Table):
                out.append(_display(block.frame).to_html(index=False, border=0, escape=True))
                if block.note:
                    out.append(f'<p class="note">{_inline_html(block.note)}</p>')
            else:
                data = base64.b64encode(images[block.name]).decode("ascii")
                out.append(f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------
# Plots (PNG bytes)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _placeholder(message: str) -> bytes:
    """A small image saying why a plot is absent, so the set of files (and the report layout) is stable."""
    fig = Figure(figsize=(6, 1.2))
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _png(fig)


def plot_escape_rates(table: pd.DataFrame, overall: float) -> bytes:
    """Escape rate per factor value with its 95% Wilson interval, one panel per varied factor."""
    factors = list(dict.fromkeys(table["factor"]))
    if not factors:
        return _placeholder("no varied factors: nothing to compare")
    ncols = min(3, len(factors))
    nrows = math.ceil(len(factors) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, factor in zip(axes.flat, factors, strict=False):
        t = table[table["factor"] == factor]
        x = np.arange(len(t))
        rate = t["escape_rate"].to_numpy(float)
        err = np.vstack([rate - t["ci_low"].to_numpy(float), t["ci_high"].to_numpy(float) - rate])
        ax.errorbar(x, rate, yerr=err, fmt="o", capsize=4)
        if not math.isnan(overall):
            ax.axhline(overall, color="grey", linestyle="--", linewidth=0.8)
        labels = list(t["value"])
        long_labels = max(map(len, labels)) > 8
        ax.set_xticks(x, labels, rotation=30 if long_labels else 0, ha="right" if long_labels else "center")
        ax.set_xlim(-0.5, len(t) - 0.5)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{factor} ({t['role'].iloc[0]})", fontsize=10)
        ax.set_ylabel("escape rate")
    for ax in list(axes.flat)[len(factors) :]:
        ax.axis("off")
    fig.suptitle("Escape rate per factor value (95% Wilson interval; dashed: overall)")
    return _png(fig)


def plot_skill_vs_lr(runs: pd.DataFrame) -> bytes:
    """Final skill against learning rate (log x), one marker set per output framing x input encoding, with
    the mean per learning rate joined by a line."""
    if "learning_rate" not in analysis.varied_factors(runs) or runs["learning_rate"].nunique() < 2:
        return _placeholder("learning_rate was not varied in this sweep")
    groups = [c for c in ("output_framing", "input_encoding") if c in runs.columns]
    frame = runs.assign(_skill=analysis.floored_skill(runs["skill"]))
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for key, g in frame.groupby(groups, sort=True):
        label = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        points = ax.scatter(g["learning_rate"], g["_skill"], alpha=0.5, s=18, label=label)
        mean = g.groupby("learning_rate")["_skill"].mean()
        ax.plot(mean.index, mean.to_numpy(), color=points.get_facecolor()[0], alpha=0.9)
    ax.set_xscale("log")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("learning_rate")
    ax.set_ylabel("final validation skill (floored at -1)")
    ax.set_title("Skill vs learning rate (dashed: the mean predictor)")
    ax.legend(title=" / ".join(groups), fontsize=8)
    return _png(fig)


def plot_interaction(runs: pd.DataFrame, pairs: pd.DataFrame) -> bytes:
    """Escape-rate heatmap of the strongest interaction, each cell annotated with its rate and run count."""
    ranked = pairs[pairs["interaction"].notna()]
    if ranked.empty:
        return _placeholder("fewer than two varied factors (or too few cells): no interaction to show")
    top = ranked.iloc[0]
    pair = analysis.pair_tables(runs, top["factor_a"], top["factor_b"])
    rate = pair.rate.to_numpy(float)
    fig = Figure(figsize=(1.6 + 1.3 * rate.shape[1], 1.4 + 0.9 * rate.shape[0]), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(rate), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(rate.shape[0]):
        for j in range(rate.shape[1]):
            missing = math.isnan(rate[i, j])
            text = "—" if missing else f"{rate[i, j]:.0%}\nn={pair.count.iat[i, j]}"
            color = "white" if not missing and rate[i, j] < 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(rate.shape[1]), [str(c) for c in pair.rate.columns])
    ax.set_yticks(range(rate.shape[0]), [str(i) for i in pair.rate.index])
    ax.set_xlabel(str(top["factor_b"]))
    ax.set_ylabel(str(top["factor_a"]))
    ax.set_title(f"Escape rate: {top['factor_a']} × {top['factor_b']}\n(interaction {top['interaction']:.3g})")
    fig.colorbar(image, ax=ax, label="escape rate")
    return _png(fig)


def _run_label(row: pd.Series, factors: Sequence[str]) -> str:
    values = ", ".join(f"{f}={analysis.format_level(row[f])}" for f in factors)
    return f"{row['verdict']}: {values}" if values else str(row["verdict"])


def _has_curve(curve: Any) -> bool:
    return isinstance(curve, Mapping) and bool(curve.get("skill"))


def pick_curve_runs(runs: pd.DataFrame, seed_runs: pd.DataFrame) -> list[pd.Series]:
    """A plateaued run (the seed's, if it plateaued) and an escaped run (the best escaped one) to contrast."""
    if runs.empty:
        return []
    chosen = []
    with_curve = runs[runs["curve"].map(_has_curve)]
    seed_plateau = seed_runs[(seed_runs["verdict"] == "plateau") & seed_runs["curve"].map(_has_curve)]
    plateau = seed_plateau if len(seed_plateau) else with_curve[with_curve["verdict"] == "plateau"]
    if len(plateau):
        chosen.append(plateau.iloc[0])
    escaped = with_curve[with_curve["verdict"] == "escaped"]
    if len(escaped):
        chosen.append(escaped.loc[escaped["skill"].idxmax()])
    return chosen


def plot_curves(runs: pd.DataFrame, seed_runs: pd.DataFrame) -> bytes:
    """Validation skill per epoch of a plateaued run against an escaped one (from the stored curves)."""
    chosen = pick_curve_runs(runs, seed_runs)
    if not chosen:
        return _placeholder("no plateaued or escaped run with a stored curve")
    factors = analysis.varied_factors(runs)
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for row in chosen:
        skill = np.array([math.nan if v is None else float(v) for v in row["curve"]["skill"]], dtype=float)
        skill = np.where(np.isfinite(skill), np.maximum(skill, SKILL_FLOOR), np.nan)
        epochs = np.arange(1, len(skill) + 1)
        (line,) = ax.plot(epochs, skill, marker="o", markersize=3, label=_run_label(row, factors))
        if not pd.isna(row["escape_epoch"]):
            ax.axvline(float(row["escape_epoch"]), color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation skill (floored at -1)")
    ax.set_title("Training curves: plateau vs escape (dotted: escape epoch)")
    # Labels name every varied factor: wrap them and put the legend under the axes, where it cannot cover a curve.
    handles, labels = ax.get_legend_handles_labels()
    wrapped = [textwrap.fill(label, 110, subsequent_indent="    ") for label in labels]
    fig.legend(handles, wrapped, fontsize=7, loc="outside lower center", ncols=1)
    return _png(fig)


# ----------------------------------------------------------------------------------------------------
# The verdict, in words, from the numbers


def _counts(verdicts: pd.Series) -> str:
    return ", ".join(f"{n} {v}" for v, n in Counter(verdicts).most_common())


def _where(verdicts: pd.Series) -> str:
    counts = Counter(verdicts)
    if len(counts) != 1:
        return "is mixed"
    only = next(iter(counts))
    return {"plateau": "sits on the plateau", "escaped": "escapes", "diverged": "diverges"}.get(only, f"ends {only}")


def seed_sentence(runs: pd.DataFrame, seed_config: Mapping[str, Any]) -> str:
    """Where the seed configuration sits: its own runs when it was run, else the nearest configuration's."""
    factors = [f for f in analysis.varied_factors(runs) if f in seed_config]
    if runs.empty or not factors:
        return "The seed configuration cannot be placed: no completed runs vary any of its factors."
    matched, diff = analysis.nearest_runs(runs, seed_config, factors)
    described = ", ".join(f"{f}={analysis.format_level(seed_config[f])}" for f in factors)
    outcome = f"{_counts(matched['verdict'])} ({len(matched)} runs)"
    if not diff:
        return f"The seed configuration ({described}) {_where(matched['verdict'])}: {outcome}."
    differs = "; ".join(f"{f} {have} instead of {want}" for f, (want, have) in diff.items())
    return (
        f"The seed configuration ({described}) was not run; the nearest configuration run (differs in: "
        f"{differs}) {_where(matched['verdict'])}: {outcome}."
    )


def _levels_text(effects: Sequence[analysis.FactorEffect]) -> str:
    return "; ".join(f"**{e.factor}** = {', '.join(e.levels)} ({e.detail})" for e in effects)


def _factor_list(effects: Sequence[analysis.FactorEffect]) -> str:
    return "; ".join(f"**{e.factor}** ({e.detail})" for e in effects)


def _combination_line(pairs: pd.DataFrame, imp: pd.DataFrame | None) -> str:
    """The top pair is 'needed together' when its adjusted interaction is noteworthy and beyond noise: F-test
    p below SIGNIFICANCE / (pairs tested), Bonferroni, since the top pair is the best of many. When the test
    cannot run (no scipy), the claim says so."""
    ranked = pairs[pairs["interaction"].notna()] if not pairs.empty else pairs
    if ranked.empty:
        return "Combinations: not testable here (fewer than two varied factors, or too few runs per cell)."
    top = ranked.iloc[0]
    left = imp.attrs.get("left_to_interactions", math.nan) if imp is not None else math.nan
    share = ""
    if isinstance(left, float) and not math.isnan(left):
        share = f"; main effects leave {left:.0%} of the escape variance across configurations unexplained"
    p, level = float(top["p_value"]), SIGNIFICANCE / len(ranked)
    p_text = "not tested: scipy missing" if math.isnan(p) else f"p {p:.2g}, Bonferroni level {level:.2g}"
    if top["interaction"] >= analysis.INTERACTION_NOTEWORTHY and (math.isnan(p) or p < level):
        return (
            f"Needed together: **{top['factor_a']}** × **{top['factor_b']}** — {top['example']} "
            f"(interaction {top['interaction']:.3g}, {p_text}{share})."
        )
    return (
        f"Combinations: none matters beyond the single factors (strongest pair {top['factor_a']} × "
        f"{top['factor_b']}, interaction {top['interaction']:.3g}, {p_text}{share})."
    )


def _skill_drivers(imp: pd.DataFrame | None) -> str:
    """Factors ranked by fANOVA share of the mean skill, for when escape itself does not vary."""
    if imp is None or imp.empty or imp["fanova_skill"].isna().all():
        return "no skill importance could be computed"
    ranked = imp.dropna(subset=["fanova_skill"]).sort_values("fanova_skill", ascending=False)
    return "; ".join(f"**{r.factor}** ({r.fanova_skill:.2f})" for r in ranked.itertuples(index=False))


def _uniform_outcome_lines(all_escaped: bool, imp: pd.DataFrame | None) -> tuple[str, ...]:
    """When every run ended the same way, escape rates cannot separate factors: say so, and point to skill."""
    if all_escaped:
        head = (
            "Escapes the plateau: every configuration did, so none of the values tried keeps runs on the "
            "plateau and no factor can be credited with the escape."
        )
    else:
        head = (
            "Escapes the plateau: nothing — no configuration escaped, so no factor value tried is enough "
            "on its own or in combination; widen the ranges or vary other factors."
        )
    return (
        head,
        f"Final skill (distance from the trivial predictor) still differs; fANOVA shares: {_skill_drivers(imp)}.",
    )


def verdict_lines(
    summary: Mapping[str, Any],
    effects: Sequence[analysis.FactorEffect],
    pairs: pd.DataFrame,
    imp: pd.DataFrame | None,
    seed: str,
) -> tuple[str, tuple[str, ...]]:
    """(opening sentence, bullet lines) of the verdict; every claim is derived from the analysis numbers."""
    n, k = summary["runs"], summary["escaped"]
    if n == 0:
        return ("No completed runs yet: nothing to conclude.", (seed,))
    lo, hi = summary["escape_ci"]
    opening = (
        f"{k} of {n} runs ({summary['escape_rate']:.0%}, 95% CI {lo:.0%}–{hi:.0%}) over "
        f"{summary['configs']} configurations escaped the mean-prediction plateau."
    )
    if k in (0, n):
        return opening, (*_uniform_outcome_lines(k == n, imp), seed)
    lines = []
    escapes = [e for e in effects if e.effect == "escapes"]
    if escapes:
        lines.append(
            f"Escapes the plateau: {_levels_text(escapes)} — the escape-rate interval of these values lies "
            "above every other value's."
        )
    else:
        lines.append(
            "Escapes the plateau: no single factor value; no value's escape-rate interval lies above the others'."
        )
    keeps = [e for e in effects if e.effect == "keeps on plateau"]
    if keeps:
        lines.append(f"Keeps runs on the plateau: {_levels_text(keeps)}.")
    quiet = [e for e in effects if e.effect == "no detectable effect"]
    if quiet:
        lines.append(f"Does not matter (intervals overlap, small importance): {_factor_list(quiet)}.")
    else:
        lines.append("Does not matter: no varied factor is clearly irrelevant.")
    unclear = [e for e in effects if e.effect == "unclear"]
    if unclear:
        lines.append(f"Unclear with this many runs: {_factor_list(unclear)}.")
    lines.append(_combination_line(pairs, imp))
    lines.append(seed)
    return opening, tuple(lines)


# ----------------------------------------------------------------------------------------------------
# Sections


def _headline_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    lo, hi = summary["escape_ci"]
    best = summary.get("best_config") or {}
    best_text = ""
    if summary["best_config_id"] is not None:
        values = ", ".join(f"{f}={analysis.format_level(v)}" for f, v in best.items())
        best_text = f"{summary['best_config_id']} ({_cell(summary['best_mean_skill'])}): {values}"
    top_text = ""
    if summary["top_factor"]:
        top_text = (
            f"{summary['top_factor']} (best value {summary['top_factor_best_level']}, spread "
            f"{_pct(summary['top_factor_spread'])})"
        )
    pair_text = ""
    if summary["top_interaction"]:
        pair_text = f"{' × '.join(summary['top_interaction'])} ({_cell(summary['top_interaction_score'])})"
    rows = [
        ("runs (trial replicates)", summary["runs"]),
        ("configurations", summary["configs"]),
        ("failed trials", summary["failed_trials"]),
        ("escaped", f"{summary['escaped']} ({_pct(summary['escape_rate'])}, 95% CI {_pct(lo)}–{_pct(hi)})"),
        ("verdicts", ", ".join(f"{v}: {c}" for v, c in summary["verdicts"].items())),
        ("plateau rate", _pct(summary["plateau_rate"])),
        ("divergence rate", _pct(summary["divergence_rate"])),
        ("median escape epoch", _cell(summary["median_escape_epoch"])),
        ("configurations whose seeds disagree", summary["disagreeing_configs"]),
        ("best configuration (mean skill)", best_text),
        ("top factor (widest escape-rate spread)", top_text),
        ("top interaction", pair_text),
    ]
    return pd.DataFrame(rows, columns=["measure", "value"]).astype({"value": str})


def _factor_display(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table
    shown = table.copy()
    shown["95% CI"] = [f"{_pct(lo)}–{_pct(hi)}" for lo, hi in zip(table["ci_low"], table["ci_high"], strict=True)]
    for col in ("escape_rate", "plateau_rate", "diverged_rate"):
        shown[col] = shown[col].map(_pct)
    columns = [
        "factor",
        "role",
        "value",
        "runs",
        "escaped",
        "escape_rate",
        "95% CI",
        "plateau_rate",
        "diverged_rate",
        "median_skill",
        "median_accuracy",
        "median_escape_epoch",
    ]
    return shown[columns]


def _importance_blocks(imp: pd.DataFrame | None, error: str | None) -> list[Block]:
    if imp is None:
        return [f"Importances could not be computed: {error}"]
    ev = imp.attrs.get("evaluators", {})
    blocks: list[Block] = [
        "Evaluators (Optuna, named explicitly): "
        f"`fanova_skill` = `{ev.get('fanova_skill')}` on the mean final skill per configuration (replicates "
        f"floored at -1); `ped_anova_skill` = `{ev.get('ped_anova_skill')}` on the same skill, negated "
        f"(PED-ANOVA treats lower as better); `fanova_escape` = `{ev.get('fanova_escape')}` on the fraction "
        "of a configuration's replicates that escaped; `eta2_escape` = each factor's one-way share of that "
        "fraction's variance. Optuna normalises fANOVA and PED-ANOVA shares to sum to 1.",
        Table(imp),
    ]

    def num(key: str) -> str:
        return _cell(imp.attrs.get(key, math.nan)) or "n/a"

    blocks.append(
        "Share left to interactions (least-squares fits of the escape fraction per configuration on one-hot "
        f"factor levels): main effects explain R² = {num('main_effects_r2')}; with every pairwise interaction "
        f"added, R² = {num('pairwise_r2')}; pairwise terms add {num('interaction_share')}, and "
        f"1 - R²(main) = {num('left_to_interactions')} is left to interactions and noise."
    )
    reasons = list(imp.attrs.get("reasons") or [])
    if reasons:
        blocks.append(Bullets(tuple(reasons)))
    return blocks


def _playbook_blocks(runs: pd.DataFrame, table: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = []
    iso = analysis.isolation(runs)
    nuisance = analysis.factors_with_role(runs, "nuisance")
    if iso.empty:
        blocks.append("Isolation: no scientific factors declared, so nothing to compare at its best setting.")
    else:
        over = ", ".join(nuisance) if nuisance else "no nuisance factors"
        blocks += [
            f"Isolation: each scientific factor value at its best setting of the nuisance factors ({over}); "
            "best = highest mean skill over replicates.",
            Table(iso),
        ]
    flags = analysis.boundary_flags(runs)
    if flags.empty:
        blocks.append("Boundary: no best configuration sits at the edge of a numeric factor's searched range.")
    else:
        blocks += [
            "Boundary: these best configurations sit at the edge of the searched range; the optimum may lie "
            "outside it, so widen the range before trusting the comparison.",
            Table(flags),
        ]
    text = f"Divergence: {_pct(analysis.divergence_rate(runs))} of runs diverged."
    if not table.empty:
        worst = table[table["diverged_rate"] > 0].sort_values("diverged_rate", ascending=False).head(5)
        if not worst.empty:
            listed = ", ".join(f"{r.factor}={r.value} {_pct(r.diverged_rate)}" for r in worst.itertuples(index=False))
            text += f" Highest by factor value: {listed}."
    blocks.append(text)
    split = analysis.replicate_disagreement(runs)
    if split.empty:
        blocks.append("Replicates: every configuration's seeds agree (none splits between escaped and plateau).")
    else:
        blocks += [
            f"Replicates: {len(split)} configuration(s) split between escaped and plateau across seeds; "
            "there, escape depends on the initialisation.",
            Table(split),
        ]
    return blocks


def _caveat_blocks(runs: pd.DataFrame) -> list[Block]:
    sweep = runs.attrs.get("sweep") or {}
    fixed = dict(sweep.get("fixed") or {})
    for name, spec in (sweep.get("factors") or {}).items():
        if spec.get("role") == "fixed":
            fixed[name] = spec.get("value", spec.get("values"))
    blocks: list[Block] = []
    if fixed:
        items = tuple(f"{k} = {analysis.format_level(v)}" for k, v in fixed.items())
        blocks += ["Held fixed by the sweep file: the conclusions hold at these values only.", Bullets(items)]
    varied = set(analysis.varied_factors(runs))
    others = []
    for f in analysis.factor_columns(runs):
        if f in varied or f in fixed or runs.empty:
            continue
        levels = list(dict.fromkeys(runs[f].map(analysis.format_level)))
        others.append(f"{f} = {', '.join(levels)}")
    if others:
        blocks.append("Other factors at their defaults: " + "; ".join(others) + ".")
    return blocks or ["No fixed factors recorded."]


def _failed_blocks(failed: pd.DataFrame) -> list[Block]:
    if failed.empty:
        return ["No trial failed."]
    shown = failed.copy()
    shown["error"] = shown["error"].map(lambda e: str(e)[:300])
    shown["params"] = shown["params"].map(
        lambda p: ", ".join(f"{k}={analysis.format_level(v)}" for k, v in p.items()) if isinstance(p, dict) else p
    )
    return [f"{len(failed)} trial(s) failed; they count as failures, not as runs.", Table(shown)]


def build_sections(
    runs: pd.DataFrame,
    table: pd.DataFrame,
    pairs: pd.DataFrame,
    summary: Mapping[str, Any],
    imp: pd.DataFrame | None,
    imp_error: str | None,
    failed: pd.DataFrame,
    seed_config: Mapping[str, Any],
) -> list[Section]:
    """The report's sections, verdict first. `summary` is `analysis.summarize(runs, table, pairs)`, taken from
    the caller so the plots and the text share one computation."""
    summary = {**summary, "failed_trials": len(failed)}
    effects = analysis.factor_effects(table, imp, balanced=analysis.is_balanced(runs))
    opening, lines = verdict_lines(summary, effects, pairs, imp, seed_sentence(runs, seed_config))
    shown_pairs = pairs.head(MAX_INTERACTION_ROWS)
    more = len(pairs) > len(shown_pairs)
    return [
        Section("Verdict", [opening, Bullets(lines)]),
        Section("Headline numbers", [Table(_headline_table(summary))]),
        Section(
            "Factors",
            [
                Table(
                    _factor_display(table),
                    note="Escape rate per factor value with a 95% Wilson interval over runs (replicates "
                    "count as independent runs, so intervals are optimistic when configurations differ a "
                    "lot).",
                ),
                Image("escape_rate.png", "escape rate per factor value"),
                Image("skill_vs_lr.png", "skill vs learning rate"),
            ],
        ),
        Section(
            "Interactions",
            [
                "`interaction` = share of the run-level escape variance that the pair's interaction "
                "explains beyond the main effects of every varied factor, minus what noise would explain "
                "with as many terms (F-test in `p_value`); 0 when the factors act independently, 0.0625 "
                "for a balanced 2×2 that escapes only in one corner. `cell_interaction` = the plain "
                "two-way residual of the pair's own cell table (what the heatmap shows).",
                Table(
                    shown_pairs,
                    note=f"Top {len(shown_pairs)} of {len(pairs)} pairs; all in interactions.csv." if more else "",
                ),
                Image("interaction.png", "escape-rate heatmap of the strongest interaction"),
            ],
        ),
        Section("Importances", _importance_blocks(imp, imp_error)),
        Section("Playbook checks", _playbook_blocks(runs, table)),
        Section("Training curves", [Image("curves.png", "validation skill per epoch, plateau vs escape")]),
        Section("Caveats: fixed factors", _caveat_blocks(runs)),
        Section("Failed trials", _failed_blocks(failed)),
    ]


# ----------------------------------------------------------------------------------------------------
# Writing


def _failed_frame(runs: pd.DataFrame, study: optuna.Study | None) -> pd.DataFrame:
    failed = analysis.load_failed(study) if study is not None else pd.DataFrame(runs.attrs.get("failed") or [])
    return pd.DataFrame(columns=FAILED_COLUMNS) if failed.empty else failed


def write_report(
    runs: pd.DataFrame,
    out_dir: Path,
    study: optuna.Study | None = None,
    seed_config: Mapping[str, Any] | None = None,
) -> ReportFiles:
    """Write report.md, report.html (self-contained), runs.csv, factors.csv, interactions.csv and the PNG
    plots into out_dir. Importances use the study when given (its real distributions), else a study rebuilt
    from the runs; failed trials come from the study, else from `runs.attrs['failed']`. `seed_config`
    defaults to the package's seed configuration. Everything is rendered before the first file is written,
    and each file is replaced atomically."""
    out_dir = Path(out_dir)
    seed_config = dict(analysis.seed_configuration() if seed_config is None else seed_config)
    table = analysis.factor_table(runs)
    pairs = analysis.interaction_table(runs)
    imp: pd.DataFrame | None = None
    imp_error = None
    try:
        imp = analysis.importances(study, runs=runs) if study is not None else analysis.importances(runs)
    except Exception as err:  # an evaluator failing on odd data must not cost the user the whole report
        imp_error = f"{type(err).__name__}: {err}"
    failed = _failed_frame(runs, study)
    seed_runs = analysis.nearest_runs(runs, seed_config)[0] if len(runs) else runs
    summary = analysis.summarize(runs, table, pairs)
    images = {
        "escape_rate.png": plot_escape_rates(table, summary["escape_rate"]),
        "skill_vs_lr.png": plot_skill_vs_lr(runs),
        "interaction.png": plot_interaction(runs, pairs),
        "curves.png": plot_curves(runs, seed_runs),
    }
    sweep = runs.attrs.get("sweep") or {}
    title = f"lstm-sweep report: {sweep.get('name') or runs.attrs.get('study_name') or 'sweep'}"
    sections = build_sections(runs, table, pairs, summary, imp, imp_error, failed, seed_config)
    if sweep.get("description"):
        sections[0].blocks.insert(0, f"Sweep: {sweep['description']}")
    contents: dict[str, bytes] = {
        "report.md": render_markdown(title, sections).encode(),
        "report.html": render_html(title, sections, images).encode(),
        "runs.csv": runs.drop(columns=["curve"], errors="ignore").to_csv(index=False).encode(),
        "factors.csv": table.to_csv(index=False).encode(),
        "interactions.csv": pairs.to_csv(index=False).encode(),
        **images,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        write_atomic(out_dir / name, data)
    return ReportFiles(
        out_dir=out_dir,
        markdown=out_dir / "report.md",
        html=out_dir / "report.html",
        runs_csv=out_dir / "runs.csv",
        factors_csv=out_dir / "factors.csv",
        interactions_csv=out_dir / "interactions.csv",
        plots=tuple(out_dir / name for name in PLOTS),
    )
