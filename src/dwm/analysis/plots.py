"""The PNG plots of `dwm analyze` (matplotlib figures without pyplot, rendered with Agg): mean weight per domain,
the correlations of the weights with the sample properties, the weight distribution, weight against LM loss and
the hypergradient signal per domain, each stage of each run side by side; PLOTS holds each file's caption."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dwm.analysis.measures import no_correlation, spearman
from dwm.analysis.runs import RunData, Stage
from dwm.analysis.summary import ETA

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
