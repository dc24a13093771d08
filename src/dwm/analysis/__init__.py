"""`dwm analyze`: the data-preference evolution of DWM runs, read from their run directories.

A DWM run saves, at every stage, the weights its weighting model gives a fixed probe set of training samples
(RUN_DIR/probes/stage_k.parquet) and the stage model's metadata (RUN_DIR/weighting/stage_k.json). This package
reads those files, the run's config.toml and the prepared data it trained on (dwm.data), and writes plots and one
static HTML report. It never imports the weighting or training code: it reads what they wrote.

    runs.py      load_run: a run directory -> RunData (stages, probe weights, sample properties, texts)
                 trained_shares: each domain's share of what a weighted run trained on (metrics.jsonl)
    measures.py  Spearman, correlation ratio, bigram novelty, weight-distribution summaries
    summary.py   per-stage numbers of a run (summary.json)
    plots.py     PNG plots (matplotlib, Agg)
    report.py    analyze(): summary.json, PNG plots (matplotlib, Agg), report.html
    cli.py       `dwm analyze RUN_DIR [RUN_DIR ...]`
"""
