"""Data selection: choose a token budget of documents from a prepared pool, one manifest format for all methods.

    dwm select --data DIR --method METHOD --budget-tokens N --out selection.parquet [--seed S] [options]
    dwm train --config ... --selection selection.parquet

One file per method, each scoring every document of the pool (dwm/selection/pool.py: what a document is, the
budget, the manifest), run by an engine over the pool's shards (engine.py: local processes or Ray Data):
  uniform.py     `random`: uniform at document level, seeded
  dsir.py        `dsir`: hashed n-gram importance resampling (Xie et al. 2023), the authors' package's features
  quality.py     `quality`: QuRating-style top-k / exp(score / tau) sampling by a score column, a local HF
                 classifier, or a hashed n-gram classifier trained between a reference set and the pool
  perplexity.py  `perplexity`: a reference LM's perplexity band
  influence.py   `influence`: MATES-style model-aware online selection, a selector of `dwm train`
                 (selector.mode = influence), built on the trainer's online-selection hook
  method.py      the interface every method implements and METHODS, the registry `--method` names
  cli.py         `dwm select`

Manifest (parquet): sample_id (int64, the training order: shuffled by seed, since `dwm train` keeps a manifest's
order), doc_id, score; the parquet schema metadata b"dwm.selection" holds a JSON object with the method, its
settings, the budget, the seed and the prepared split's fingerprint (`dwm train` refuses a manifest whose
fingerprint is not its data's). Beside it, <out>.json: the same plus per-domain token shares of pool and selection.
"""

from dwm.selection.method import METHODS

for _name, _entry in (("random", "dwm.selection.uniform:RandomMethod"), ("dsir", "dwm.selection.dsir:DSIRMethod"),
                      ("quality", "dwm.selection.quality:QualityMethod"),
                      ("perplexity", "dwm.selection.perplexity:PerplexityMethod"),
                      ("influence", "dwm.selection.influence:InfluenceMethod")):
    METHODS.register(_name, _entry)
