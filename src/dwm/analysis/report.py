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

from dwm.analysis.plots import (
    MAX_SCATTER_STAGES,
    PLOTS,
    log_ticks,
    plot_correlations,
    plot_domain_weights,
    plot_signal,
    plot_weight_distribution,
    plot_weight_vs_loss,
)
from dwm.analysis.runs import RunData
from dwm.analysis.summary import ETA, json_safe, properties, run_summary, stage_summary, vs_rest_name

# the names this module always offered, now kept in dwm.analysis.summary and dwm.analysis.plots
__all__ = ["CSS", "ETA", "MAX_SCATTER_STAGES", "PLOTS", "analyze", "log_ticks", "plot_correlations",
           "plot_domain_weights", "plot_signal", "plot_weight_distribution", "plot_weight_vs_loss", "properties",
           "render_html", "run_summary", "stage_summary", "vs_rest_name"]


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
    (out / "summary.json").write_text(json.dumps(json_safe({"runs": summaries, "plots": plots}), indent=2))
    report = out / "report.html"
    report.write_text(render_html(summaries, plots), encoding="utf-8")
    return report
