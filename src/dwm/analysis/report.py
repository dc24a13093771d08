"""`analyze(runs, out_dir)`: per stage of each run, what the weighting model prefers, as numbers (summary.json),
PNG plots and one static HTML page (report.html) that shows them, runs side by side.

Per stage, over the run's probe set (a fixed, domain-stratified sample of its training data):
- the mean weight per domain (1 = the domain's share of an unweighted batch), and the LM's mean loss per domain;
- Spearman correlations of the weight with each sample's length (real tokens), the LM's loss on it at that stage
  (`lm_loss` of the probes; perplexity = exp(loss) has the same Spearman), its diversity (bigram novelty within
  the probe set) and every score column of the prepared data (DSIR or quality scores where `dwm prepare` kept
  them); the domain as the correlation ratio eta of the weight ranks by domain (unsigned) and per domain as the
  one-vs-rest Spearman (signed); definitions in dwm/analysis/measures.py;
- the weight distribution (quantiles, effective sample size, entropy);
- the highest- and lowest-weighted samples with the start of their decoded text;
- where the run wrote signal/stage_k.parquet (DWM runs that learn), what the hypergradient said in that stage: the
  mean signal -dL_ref/dw (on phi's std-normalised scale; positive = weighting the sample up lowers the reference
  loss) per domain with its standard error and count, and the Spearman correlation over domains of the mean weight
  with the mean signal: how closely the weighting model's domain preference follows the stage's evidence.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dwm.analysis.measures import (
    correlation_ratio,
    group_means,
    no_correlation,
    one_vs_rest,
    spearman,
    weight_summary,
)
from dwm.analysis.runs import RunData, Stage

PLOTS = {
    "domain_weights.png": "Mean weight per domain at each stage (1 = the domain's unweighted share).",
    "correlations.png": "Spearman correlation of the weights with each sample property at each stage; dashed: "
                        "correlation ratio eta of the weight ranks by domain (unsigned).",
    "weight_distribution.png": "Weight distribution of the probe set at each stage (box: quartiles, whiskers: "
                               "5th-95th percentile).",
    "weight_vs_loss.png": "Weight against the LM's loss on each probe sample, per stage, coloured by domain.",
    "signal_by_domain.png": "Mean hypergradient signal -dL/dw per domain of the samples each stage's updates "
                            "probed (std-normalised; bars: one standard error).",
}
MAX_SCATTER_STAGES = 8
ETA = "domain (eta)"


def vs_rest_name(d: str) -> str:
    return f"domain = {d} vs rest"


def properties(run: RunData, st: Stage) -> dict[str, np.ndarray | None]:
    """name -> the per-sample values the weights are correlated with (None: not available for this run)."""
    props: dict[str, np.ndarray | None] = {"length (tokens)": run.n_tokens, "LM loss": st.lm_loss,
                                           "diversity (bigram novelty)": run.novelty}
    for c, v in run.scores.items():
        props[f"score: {c}"] = v
    return props


def stage_summary(run: RunData, st: Stage, n_examples: int, chars: int) -> dict[str, Any]:
    ok = np.isfinite(st.weight)
    w, dom = st.weight[ok], run.domain[ok]
    ids = run.ids[ok]
    loss = st.lm_loss[ok] if st.lm_loss is not None else None
    corr, why = {}, {}
    for name, v in properties(run, st).items():
        corr[name] = None if v is None else spearman(w, v[ok])[0]
        if v is not None and math.isnan(corr[name]):
            why[name] = no_correlation(w, v[ok])
    eta, vs_rest = correlation_ratio(dom, w), one_vs_rest(dom, w)
    if math.isnan(eta):  # NaN only for constant weights or under 3 samples
        why[ETA] = no_correlation(w, np.arange(len(w)))
    for d, rho in vs_rest.items():
        if math.isnan(rho):
            why[vs_rest_name(d)] = no_correlation(w, (dom == d).astype(np.float64))
    order = np.argsort(-w, kind="stable")

    def example(i: int) -> dict[str, Any]:
        return {"sample_id": int(ids[i]), "domain": str(dom[i]), "weight": float(w[i]),
                "lm_loss": float(loss[i]) if loss is not None else None, "n_tokens": int(run.n_tokens[ok][i]),
                "text": run.text(int(ids[i]), chars)}

    n_ex = min(n_examples, len(w))
    mean_w = {d: float(w[dom == d].mean()) for d in run.domains if (dom == d).any()}
    signal = group_means(*st.signal) if st.signal is not None else None
    follows = None
    if signal is not None:
        ds = [d for d in signal if d in mean_w]
        follows = spearman([mean_w[d] for d in ds], [signal[d]["mean"] for d in ds])[0]
    return {
        "stage": st.k, "step": st.step, "total_steps": st.total_steps, "updates": st.updates, "skipped": st.skipped,
        "mean_weight_by_domain": mean_w,
        "mean_lm_loss_by_domain": ({d: float(np.nanmean(loss[dom == d])) for d in run.domains if (dom == d).any()}
                                   if loss is not None else None),
        "spearman": corr,
        "domain_eta": eta,
        "domain_vs_rest": vs_rest,
        "no_correlation": why,
        "weights": weight_summary(w),
        "signal_by_domain": signal,
        "weight_follows_signal": follows,
        "top": [example(i) for i in order[:n_ex]],
        "bottom": [example(i) for i in order[::-1][:n_ex]],
    }


def run_summary(run: RunData, n_examples: int, chars: int) -> dict[str, Any]:
    return {"label": run.label, "dir": str(run.dir), "mode": run.mode, "data_dir": str(run.data_dir),
            "split": run.split, "domains": run.domains, "probe_size": len(run.ids), "lm_loss": run.has_lm_loss,
            "score_columns": list(run.scores), "notes": list(run.notes),
            "stages": [stage_summary(run, st, n_examples, chars) for st in run.stages]}


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ---------------------------------------------------------------- plots


def _figure(nrows: int, ncols: int, w: float = 5.2, h: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global backend state; savefig renders with Agg

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _stage_ticks(ax, stages: list[dict[str, Any]]) -> None:
    ax.set_xticks([s["stage"] for s in stages], [f"{s['stage']}\n(step {s['step']})" for s in stages],
                  fontsize=8)
    ax.set_xlabel("stage")


def plot_domain_weights(summaries: list[dict[str, Any]], path: Path) -> None:
    domains = sorted({d for s in summaries for d in s["domains"]})
    col = _colours(domains)
    fig, axes = _figure(1, len(summaries))
    for ax, s in zip(axes[0], summaries):
        x = [st["stage"] for st in s["stages"]]
        for d in s["domains"]:
            ax.plot(x, [st["mean_weight_by_domain"].get(d, math.nan) for st in s["stages"]], marker="o",
                    color=col[d], label=d)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        _stage_ticks(ax, s["stages"])
        ax.set_ylabel("mean weight")
        ax.set_title(s["label"], fontsize=10)
        ax.legend(fontsize=7, ncols=2 if len(s["domains"]) > 5 else 1)
    fig.savefig(path, dpi=90)


def plot_correlations(summaries: list[dict[str, Any]], path: Path) -> Any:
    names = list(dict.fromkeys(n for s in summaries for st in s["stages"] for n in st["spearman"]))
    col = _colours(names + [ETA])
    fig, axes = _figure(1, len(summaries))
    for ax, s in zip(axes[0], summaries):
        x = [st["stage"] for st in s["stages"]]
        for n in names:
            y = [st["spearman"].get(n) for st in s["stages"]]
            if all(v is None for v in y):
                continue
            ax.plot(x, [math.nan if v is None else v for v in y], marker="o", color=col[n],
                    label=_corr_label(n, s["stages"]))
        ax.plot(x, [st["domain_eta"] for st in s["stages"]], marker="s", ls="--", color=col[ETA],
                label=_corr_label(ETA, s["stages"]))
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-1.05, 1.05)
        _stage_ticks(ax, s["stages"])
        ax.set_ylabel("Spearman rho with the weight")
        ax.set_title(s["label"], fontsize=10)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return fig


def _corr_label(name: str, stages: list[dict[str, Any]]) -> str:
    """The legend entry of a correlation: its name, and why it has no value where it has none (a constant
    property: no point is drawn, and the legend says so instead of leaving an unexplained gap)."""
    why = [(st["stage"], st.get("no_correlation", {}).get(name)) for st in stages]
    why = [(k, r) for k, r in why if r]
    if not why:
        return name
    reasons = "; ".join(sorted({r for _, r in why}))
    if len(why) == len(stages):
        return f"{name}: {reasons}"
    return f"{name} ({reasons} at stage {', '.join(str(k) for k, _ in why)})"


def log_ticks(lo: float, hi: float, max_ticks: int = 8) -> list[float]:
    """Labelled ticks of a log axis over [lo, hi] (0 < lo <= hi): 1-2-3-5 where that is at most 5 ticks, else
    1-2-5, else 1-3, else powers of ten (every decade, or every k-th one), the first with 2 to `max_ticks` ticks;
    a range too narrow for two of them (within a factor of 2) gets a few round linear steps (the axis is nearly
    linear there). No minor tick is labelled: labelling each of them (2, 3, ..., 9 per decade) is what
    overlapped."""
    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    for subs in ((1, 2, 3, 5), (1, 2, 5), (1, 3), (1,)):
        t = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in subs]
        t = [v for v in t if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
        if subs == (1, 2, 3, 5) and len(t) > min(5, max_ticks):
            continue  # 2 and 3 only where few ticks would show
        if 2 <= len(t) <= max_ticks:
            return [float(f"{v:.12g}") for v in t]
        if len(t) > max_ticks and subs == (1,):
            step = math.ceil(len(t) / max_ticks)
            return [float(f"{v:.12g}") for v in t[::step]]
    from matplotlib.ticker import MaxNLocator

    t = [v for v in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= v <= hi]
    return [float(f"{v:.12g}") for v in t]


def plot_weight_distribution(runs: list[RunData], summaries: list[dict[str, Any]], path: Path) -> Any:
    fig, axes = _figure(1, len(runs))
    for ax, run, s in zip(axes[0], runs, summaries):
        data = [st.weight[np.isfinite(st.weight)] for st in run.stages]
        ax.boxplot(data, positions=[st.k for st in run.stages], whis=(5, 95), showfliers=True,
                   flierprops={"markersize": 2, "alpha": 0.4})
        if all(len(d) and d.min() > 0 for d in data):
            from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

            ax.set_yscale("log")
            lo = min(1.0, *(float(d.min()) for d in data))  # the y range: every weight and the line at 1
            hi = max(1.0, *(float(d.max()) for d in data))
            ax.yaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        _stage_ticks(ax, s["stages"])
        ax.set_ylabel("weight")
        ax.set_title(s["label"], fontsize=10)
    fig.savefig(path, dpi=90)
    return fig


def _shown_stages(run: RunData) -> list[Stage]:
    st = run.stages
    if len(st) <= MAX_SCATTER_STAGES:
        return st
    pick = np.unique(np.linspace(0, len(st) - 1, MAX_SCATTER_STAGES).round().astype(int))
    return [st[i] for i in pick]


def plot_weight_vs_loss(runs: list[RunData], summaries: list[dict[str, Any]], path: Path) -> None:
    domains = sorted({d for r in runs for d in r.domains})
    col = _colours(domains)
    shown = [_shown_stages(r) for r in runs]
    nrows = max(len(s) for s in shown)
    fig, axes = _figure(nrows, len(runs), w=4.6, h=3.0)
    for j, (run, stages) in enumerate(zip(runs, shown)):
        for i in range(nrows):
            ax = axes[i][j]
            if i >= len(stages):
                ax.set_axis_off()
                continue
            st = stages[i]
            if st.lm_loss is None:
                ax.text(0.5, 0.5, "no lm_loss in this run's probes", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9)
                ax.set_axis_off()
                continue
            for d in run.domains:
                m = (run.domain == d) & np.isfinite(st.weight)
                ax.scatter(st.lm_loss[m], st.weight[m], s=6, alpha=0.6, color=col[d], label=d)
            rho = spearman(st.weight, st.lm_loss)[0]
            said = no_correlation(st.weight, st.lm_loss) if math.isnan(rho) else f"rho = {rho:.2f}"
            ax.set_title(f"{run.label}: stage {st.k} (step {st.step}), {said}", fontsize=8)
            ax.set_xlabel("LM loss (nats/token)", fontsize=8)
            ax.set_ylabel("weight", fontsize=8)
            if i == 0:
                ax.legend(fontsize=6, markerscale=2)
    fig.savefig(path, dpi=80)


def plot_signal(summaries: list[dict[str, Any]], path: Path) -> None:
    domains = sorted({d for s in summaries for d in s["domains"]})
    col = _colours(domains)
    fig, axes = _figure(1, len(summaries))
    for ax, s in zip(axes[0], summaries):
        stages = [st for st in s["stages"] if st["signal_by_domain"]]
        for d in s["domains"]:
            pts = [(st["stage"], st["signal_by_domain"][d]) for st in stages if d in st["signal_by_domain"]]
            if pts:
                ax.errorbar([x for x, _ in pts], [v["mean"] for _, v in pts],
                            yerr=[0.0 if math.isnan(v["se"]) else v["se"] for _, v in pts], marker="o",
                            capsize=2, color=col[d], label=d)
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        _stage_ticks(ax, s["stages"])
        ax.set_ylabel("mean signal -dL/dw (std units)")
        ax.set_title(s["label"], fontsize=10)
        if stages:
            ax.legend(fontsize=7, ncols=2 if len(s["domains"]) > 5 else 1)
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------- HTML


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{nd}f}"
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _cols(blocks: list[str]) -> str:
    return f'<div class="cols" style="grid-template-columns: repeat({len(blocks)}, minmax(0, 1fr))">' + "".join(
        f"<div>{b}</div>" for b in blocks) + "</div>"


def _stage_header(s: dict[str, Any]) -> list[str]:
    return [f"stage {st['stage']} (step {st['step']})" for st in s["stages"]]


def _domain_block(s: dict[str, Any]) -> str:
    out = f"<h4>{html.escape(s['label'])}</h4>" + _table(
        ["domain", *_stage_header(s)],
        [[html.escape(d), *[_f(st["mean_weight_by_domain"].get(d)) for st in s["stages"]]] for d in s["domains"]])
    if s["lm_loss"]:
        out += "<p>LM loss per domain (mean nats/token over the probe samples)</p>" + _table(
            ["domain", *_stage_header(s)],
            [[html.escape(d), *[_f(st["mean_lm_loss_by_domain"].get(d)) for st in s["stages"]]]
             for d in s["domains"]])
    return out


def _signal_block(s: dict[str, Any]) -> str:
    def cell(v: dict[str, float] | None) -> str:
        return "–" if v is None else f"{v['mean']:+.2f} ± {_f(v['se'], 2)} ({v['n']})"

    rows = [[html.escape(d), *[cell((st["signal_by_domain"] or {}).get(d)) for st in s["stages"]]]
            for d in s["domains"]]
    rows.append(["Spearman: weight vs signal", *[_f(st["weight_follows_signal"]) for st in s["stages"]]])
    return f"<h4>{html.escape(s['label'])}</h4>" + _table(["domain: signal ± s.e. (n)", *_stage_header(s)], rows)


def _corr_block(s: dict[str, Any]) -> str:
    names = list(dict.fromkeys(n for st in s["stages"] for n in st["spearman"]))

    def cell(st: dict[str, Any], name: str, v: Any) -> str:
        why = st.get("no_correlation", {}).get(name)
        return f'<span class="why">{html.escape(why)}</span>' if why else _f(v)

    rows = [[html.escape(n), *[cell(st, n, st["spearman"].get(n)) for st in s["stages"]]] for n in names]
    rows.append(["domain: eta (unsigned)", *[cell(st, ETA, st["domain_eta"]) for st in s["stages"]]])
    for d in s["domains"]:
        rows.append([html.escape(vs_rest_name(d)),
                     *[cell(st, vs_rest_name(d), st["domain_vs_rest"].get(d)) for st in s["stages"]]])
    note = "" if s["lm_loss"] else ('<p class="note">No lm_loss in this run\'s probes: the LM-loss correlation is '
                                    "skipped (–).</p>")
    return f"<h4>{html.escape(s['label'])}</h4>" + _table(["Spearman rho of the weight with", *_stage_header(s)],
                                                          rows) + note


def _dist_block(s: dict[str, Any]) -> str:
    keys = ["min", "p10", "p25", "median", "p75", "p90", "max", "ess_fraction", "entropy"]
    rows = [[k, *[_f(st["weights"][k]) for st in s["stages"]]] for k in keys]
    return f"<h4>{html.escape(s['label'])}</h4>" + _table(["weight", *_stage_header(s)], rows)


def _examples(title: str, exs: list[dict[str, Any]]) -> str:
    items = "".join(
        f"<li><span class=\"meta\">#{e['sample_id']} · {html.escape(e['domain'])} · w = {_f(e['weight'])}"
        f"{'' if e['lm_loss'] is None else ' · loss = ' + _f(e['lm_loss'])} · {e['n_tokens']} tokens</span>"
        f"<pre>{html.escape(e['text'])}</pre></li>" for e in exs)
    return f"<p><b>{title}</b></p><ol>{items}</ol>"


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 1500px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.cols { display: grid; gap: 1.5em; }
.cols > div { overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; }
pre { white-space: pre-wrap; font-size: 0.8em; background: #f6f6f6; padding: 0.3em; margin: 0.2em 0 0.6em; }
.meta { font-size: 0.8em; color: #555; }
.note { color: #a33; }
.why { color: #777; font-size: 0.9em; }
"""


def render_html(summaries: list[dict[str, Any]], plots: list[str]) -> str:
    labels = ", ".join(s["label"] for s in summaries)
    run_rows = [[html.escape(s["label"]), html.escape(s["dir"]), html.escape(s["mode"]),
                 html.escape(f"{s['data_dir']} ({s['split']})"), str(s["probe_size"]), str(len(s["stages"])),
                 "yes" if s["lm_loss"] else "no", html.escape(", ".join(s["score_columns"]) or "none"),
                 "<br>".join(html.escape(n) for n in s["notes"]) or ""] for s in summaries]
    parts = [
        (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>dwm analyze: {html.escape(labels)}</title>"
         f"<style>{CSS}</style></head><body>"),
        f"<h1>Data preferences of {html.escape(labels)}</h1>",
        "<h2>Runs</h2>",
        _table(["run", "directory", "weighting", "data (split)", "probe samples", "stages", "lm_loss",
                "score columns", "notes"], run_rows),
        ("<h2>How to read this</h2><ul>"
        "<li>Each stage's weighting model weights a fixed, domain-stratified probe set of training samples; "
        "weights are B&middot;softmax(s/&tau;) over the probe set, so they average 1 and 1 is uniform training.</li>"
        "<li><b>Spearman &rho;</b> of the weight with each property, over the probe set: length = real tokens; "
        "LM loss = the LM's mean token NLL on the sample at that stage (perplexity = exp(loss) has the same &rho;); "
        "diversity = <i>bigram novelty</i>, the share of the sample's distinct token bigrams found in no other "
        "probe sample; <i>score: X</i> = the prepared data's score columns.</li>"
        "<li><b>Domain</b>: the correlation ratio &eta; of the weight ranks by domain (0: the domain says nothing "
        "about the weight, 1: it fixes the order; unsigned), and per domain the one-vs-rest Spearman &rho; of the "
        "weight with [domain = d] (positive: d is preferred).</li>"
        "<li><b>ESS fraction</b> = (&Sigma;w)&sup2; / (n &Sigma;w&sup2;); <b>entropy</b> of w/&Sigma;w over log n "
        "(both 1 for uniform weights).</li></ul>"),
        "<h2>Figures</h2>",
    ]
    for p in plots:
        parts.append(f"<figure><img src=\"{html.escape(p)}\" alt=\"{html.escape(p)}\">"
                     f"<figcaption>{html.escape(PLOTS[p])}</figcaption></figure>")
    parts += ["<h2>Mean weight per domain</h2>", _cols([_domain_block(s) for s in summaries]),
              "<h2>Correlations</h2>", _cols([_corr_block(s) for s in summaries])]
    if any(st["signal_by_domain"] for s in summaries for st in s["stages"]):
        parts += ["<h2>What the hypergradient said</h2>",
                  ("<p>Per stage, the samples that stage's bi-level updates probed: the mean of their signal "
                   "-dL<sub>ref</sub>/dw per domain (std-normalised per update, the scale the weighting model fits; "
                   "positive = weighting the sample up lowers the reference loss), &plusmn; one standard error, "
                   "(count); and the Spearman &rho; over domains of the stage's mean weight with the mean signal. "
                   "Domains with few probed samples have wide errors.</p>"),
                  _cols([_signal_block(s) for s in summaries])]
    parts += ["<h2>Weight distribution</h2>", _cols([_dist_block(s) for s in summaries]),
              "<h2>Highest- and lowest-weighted samples</h2>"]
    n_stages = max(len(s["stages"]) for s in summaries)
    for i in range(n_stages):
        blocks = []
        for s in summaries:
            if i >= len(s["stages"]):
                blocks.append(f"<h4>{html.escape(s['label'])}</h4><p>(no stage)</p>")
                continue
            st = s["stages"][i]
            blocks.append(f"<h4>{html.escape(s['label'])}: stage {st['stage']} (step {st['step']})</h4>"
                          + _examples("highest weights", st["top"]) + _examples("lowest weights", st["bottom"]))
        parts.append(_cols(blocks))
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- entry point


def analyze(runs: list[RunData], out_dir: str | Path, n_examples: int = 3, chars: int = 300) -> Path:
    """Write summary.json, the PNGs and report.html into out_dir; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [run_summary(r, n_examples, chars) for r in runs]
    plots = ["domain_weights.png", "correlations.png", "weight_distribution.png"]
    plot_domain_weights(summaries, out / plots[0])
    plot_correlations(summaries, out / plots[1])
    plot_weight_distribution(runs, summaries, out / plots[2])
    if any(st.signal is not None for r in runs for st in r.stages):
        plots.append("signal_by_domain.png")
        plot_signal(summaries, out / plots[-1])
    if any(r.has_lm_loss or any(s.lm_loss is not None for s in r.stages) for r in runs):
        plots.append("weight_vs_loss.png")
        plot_weight_vs_loss(runs, summaries, out / plots[-1])
    (out / "summary.json").write_text(json.dumps(_json_safe({"runs": summaries, "plots": plots}), indent=2))
    report = out / "report.html"
    report.write_text(render_html(summaries, plots), encoding="utf-8")
    return report
