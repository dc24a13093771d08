"""DWM benchmark: does the learned weighting help, against the headroom a static mixture shows? (prints figures;
not a test)

    .venv/bin/python benchmarks/bench_dwm.py [--part main|second|ablation|ablation-weights|all] [--seeds 0 1 2] [--jobs 2]

Every run trains the same model (`--preset`, default cpu-small; cpu-mini is the demo's) on the same budget (default
the demo's: 150 steps x 4096 tokens) and is evaluated on
the target's `heldout` passages (what is reported) and on its `reference` passages (what the weighting model
optimises against, and the only side defaults and oracle mixtures are chosen on). Paired by seed: the same seed
gives the same model init and data stream to every arm.

- main: the shipped target (novels: reference Emma + Northanger Abbey, heldout Persuasion + Moby Dick) on the
  shipped corpus. Arms: uniform; DWM with the shipped cpu-small-dwm defaults; and the headroom oracle, the best
  static mixture at the same budget from a grid over the target-like domain's share (books at 25%, 50%, 100%:
  a selection manifest, dwm.data.mixture), the best chosen by mean *reference* passage loss.
- second: a target cut from documents held out of the speech domain (State of the Union addresses; held out of
  training too, `dwm target build --from ... --train ...` refuses any overlap), on the corpus without them.
  Same arms, the oracle grid over speech's share.
- ablation: one DWM lever changed at a time from the defaults, or from the kl-0.5 defaults of 15e6dc9 (kl 0.5), of e733381
  (kl 0.5, batch_size 64) or of 7faa313 (kl 1.0, batch_size 64), where most levers were measured (a second
  table: from the in-batch-weights defaults shipped until 7faa313), on the main target (`--ablation-target
  speech`: the second): the change of *reference* passage loss against uniform (paired, per seed and mean), its
  share of the reference-side headroom, and the cost.
  `--rows PREFIX ...` runs only those rows (and the defaults'); `--no-oracle` trains no static mixture, for a lever
  checked on fresh seeds against a gap measured before (the share column is then empty).

`--inbatch-oracle V [V ...]` adds the in-batch oracle to main/second: the target's domain weighted by V within
every batch (`weighting.mode = domains`, hand-set, on the uniform stream), i.e. what in-batch weights toward the
target can gain at the budget however well phi learns them; its paired difference and share of the static gap are
printed beside DWM's.

`--steps 40 --batch-tokens 16384 --out benchmarks/out/dwm_b64` is the same token budget in batches of 64 samples
instead of 16, where a batch holds enough of the target's domain for in-batch weights to act; `--steps 40
--batch-tokens 4096 --out benchmarks/out/dwm_s40` is its control, the same 40 steps in batches of 16 (a quarter of
the tokens), which separates the batch size from the point of training (docs/DECISIONS.md).

Figures: per arm the heldout passage loss (mean +- s.e. over seeds); the paired difference DWM - uniform per seed
with its mean and standard error; DWM's share of the uniform -> oracle gap; per-domain held-out loss of the three;
the whole-run cost DWM / uniform (train wall time, probe scoring excluded; side by side only where the two were
trained together, a reused run keeps its own); the mean probe weight per domain at the last stage and the target
domain's rank; the target domain's share of DWM's trained loss.

Runs are cached in --out and identified by their resolved configuration (config.toml without the output path): a
finished run is never retrained, so an interrupted benchmark continues; a cell whose configuration another
finished run has reuses that run (training is deterministic given the configuration: same seed, init and stream),
e.g. the DWM arm and an ablation row that equals the defaults; and a cached run of a cell whose configuration
changed (the recipe's defaults moved) is kept aside as KEY.stale-TIME and the cell retrained. Results are appended
to benchmarks/results/dwm.md.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "dwm.md"

# one DWM lever changed at a time from the shipped cpu-small-dwm defaults (weighting.* overrides)
ABLATIONS: dict[str, list[str]] = {
    "kl=0.5 (a stronger pull toward uniform: the kl-0.5 defaults of 15e6dc9)": ["weighting.advanced.kl=0.5"],
    "probe_len=128 (the bi-level update's LM forwards half as long: a cost lever)": ["weighting.advanced.probe_len=128"],
    "uniform_stages=1 (no update at step 0: stage 0 trains uniformly; a cost lever)": ["weighting.advanced.uniform_stages=1"],
    "frozen_stages=2 (updates at stages 0-2 only, phi kept after: 3 of 5 updates; a cost lever)": [
        "weighting.advanced.frozen_stages=2"],
    "candidates=8 (a domain can reach 8x its corpus share, not 4x: speech's cap 66%, not 33%)": [
        "weighting.candidates=8"],
}
# ... and from the kl-0.5 defaults of 15e6dc9 (kl 0.5), where these levers were measured (rows reproducible)
STOP21 = ["weighting.advanced.kl=0.5"]
ABLATIONS.update({f"kl=0.5, {name}": STOP21 + ov for name, ov in {
    "batch_size=64 (half the probed samples per update: the kl-0.5, batch-64 defaults (e733381))": ["weighting.advanced.batch_size=64"],
}.items()})
# ... and from the kl-0.5, batch-64 defaults (e733381) (kl 0.5, batch_size 64), where these levers were measured
STOP20 = STOP21 + ["weighting.advanced.batch_size=64"]
ABLATIONS.update({f"batch_size=64, {name}": STOP20 + ov for name, ov in {
    "kl=1.0 (a stronger pull toward uniform: the kl-1.0 defaults of 7faa313)": ["weighting.advanced.kl=1.0"],
    "kl=0.35": ["weighting.advanced.kl=0.35"],
    "kl=0.25 (weaker still)": ["weighting.advanced.kl=0.25"],
    "candidates=3 (a smaller pool: cheaper scoring)": ["weighting.candidates=3"],
    "net.width=64 (phi a third of the scoring cost)": ["weighting.net.width=64"],
    "probe_len=128 (the bi-level update's LM forwards half as long)": ["weighting.advanced.probe_len=128"],
}.items()})
# ... and from the kl-1.0 defaults of 7faa313 (kl 1.0, batch_size 64), where these levers were measured
STOP17 = STOP20 + ["weighting.advanced.kl=1.0"]
ABLATIONS.update({f"kl=1.0, {name}": STOP17 + ov for name, ov in {
    "apply=weights (the paper's in-batch weights, tau 1; domain input and 5-stage buffer kept)": [
        "weighting.apply=weights", "weighting.candidates=2", "weighting.temperature=1"],
    "temperature=0.5": ["weighting.temperature=0.5"],
    "temperature=0.125": ["weighting.temperature=0.125"],
    "candidates=8": ["weighting.candidates=8"],
    "net.max_len=64 (phi reads 64 tokens: half the scoring cost)": ["weighting.net.max_len=64"],
    "resampling alone: temperature=0.5, no domain input, buffer_stages=1": [
        "weighting.temperature=0.5", "weighting.net.use_domain_feature=false", "weighting.advanced.buffer_stages=1"],
}.items()})

# the defaults before resampling was adopted (7faa313): the paper's in-batch weights, no domain input, one stage's
# buffer, with 7faa313's KL 1 and 64 probed samples. The first ablation table's levers are one change from these
# (its rows are kept reproducible).
WEIGHTS_DEFAULTS = [*STOP17, "weighting.apply=weights", "weighting.candidates=2", "weighting.temperature=1",
                    "weighting.net.use_domain_feature=false", "weighting.advanced.buffer_stages=1"]
ABLATIONS_FROM_WEIGHTS: dict[str, list[str]] = {name: WEIGHTS_DEFAULTS + ov for name, ov in {
    "paper-like: 1 update of one batch (G samples) per stage, 1 phi step of lr 1e-2, no KL, raw dL/dw": [
        "weighting.advanced.batch_size=0", "weighting.advanced.phi_steps=1", "weighting.advanced.lr=1e-2", "weighting.advanced.kl=0",
        "weighting.advanced.normalize=none"],
    "apply=resample, candidates=4 (weights choose the batch)": ["weighting.apply=resample",
                                                               "weighting.candidates=4"],
    "kl=0 (no penalty)": ["weighting.advanced.kl=0"],
    "kl=2": ["weighting.advanced.kl=2"],
    "normalize=none": ["weighting.advanced.normalize=none"],
    "phi_steps=1": ["weighting.advanced.phi_steps=1"],
    "batch_size=G (probe one batch per update)": ["weighting.advanced.batch_size=0"],
    "batch_size=128, probe_len=128, phi_steps=16, kl=0.5, buffer_stages=2": [
        "weighting.advanced.batch_size=128", "weighting.advanced.probe_len=128", "weighting.advanced.phi_steps=16", "weighting.advanced.kl=0.5",
        "weighting.advanced.buffer_stages=2"],
    "updates_per_stage=4": ["weighting.advanced.updates_per_stage=4"],
    "schedule=interleaved, interval 10, batch_size 32": ["weighting.schedule=interleaved", "weighting.interval=10",
                                                         "weighting.advanced.batch_size=32"],
    "ref_loss=target": ["weighting.advanced.ref_loss=target"],
    "use_domain_feature": ["weighting.net.use_domain_feature=true"],
}.items()}


@dataclass(frozen=True)
class Budget:
    """What every run of one benchmark invocation trains: the model and the token budget."""

    steps: int = 150
    batch_tokens: int = 4096
    preset: str = "cpu-small"

    def __str__(self) -> str:
        return f"{self.preset}, {self.steps} steps x {self.batch_tokens} tokens"


@dataclass
class Target:
    name: str
    data: Path
    reference: Path
    heldout: Path
    domain: str  # the target-like domain: the oracle grid is over its share
    grid: tuple[float, ...] = (0.25, 0.5, 1.0)


@dataclass
class Cell:
    target: str
    arm: str  # "uniform" | "dwm" | "static:<share>" | "inbatch:<weight>" | "ablation:<name>"
    seed: int
    overrides: list[str] = field(default_factory=list)
    recipe: str = ""  # the run recipe (default: cpu-small-uniform for uniform/static/inbatch arms, else cpu-small-dwm)

    @property
    def key(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.arm)[:60]
        return f"{self.target}/{safe}-s{self.seed}"


# ---------------------------------------------------------------- data


def prepare_targets(out: Path) -> dict[str, Target]:
    """The shipped corpus and target, and the speech target cut from held-out speech documents."""
    from dwm.data.prepare import PrepareOptions, prepare

    novels = Target("novels", out / "data", REPO / "data/target/reference.jsonl",
                    REPO / "data/target/heldout.jsonl", "books")
    prepare([REPO / "data" / "corpus"], novels.data, PrepareOptions(vocab_size=8192, seq_len=256, progress=False))
    return {"novels": novels, "speech": cut_target(out / "speech", "speech", novels.data / "tokenizer.json")}


def cut_target(where: Path, domain: str, tokenizer: Path) -> Target:
    """A target cut from `domain`: a quarter of its documents (by a seeded hash of the id) become the target's
    passages (`dwm target build --from`), never trained on; the corpus without them is prepared with `tokenizer`."""
    from dwm.data.prepare import PrepareOptions, is_val, prepare

    corpus = where / "corpus"
    held = where / f"{domain}__heldout.jsonl"
    if not (where / "target" / "heldout.jsonl").is_file():
        import zstandard

        corpus.mkdir(parents=True, exist_ok=True)
        held.unlink(missing_ok=True)
        for f in sorted((REPO / "data" / "corpus").glob("*.jsonl.zst")):
            if not f.name.startswith(f"{domain}__"):
                if not (corpus / f.name).exists():
                    (corpus / f.name).symlink_to(f)
                continue
            with open(f, "rb") as fh:
                text = zstandard.ZstdDecompressor().stream_reader(fh).read().decode("utf-8")
            rows = [json.loads(x) for x in text.splitlines() if x.strip()]
            (corpus / f.name.removesuffix(".zst")).write_text(
                "".join(json.dumps(r) + "\n" for r in rows if not is_val(r["id"], 7, 0.25)))
            with open(held, "a") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in rows if is_val(r["id"], 7, 0.25)))
        prepare([corpus], where / "data", PrepareOptions(tokenizer=str(tokenizer), seq_len=256, progress=False))
        from dwm.cli import main

        if main(["target", "build", "--from", str(held), "--train", str(where / "data"), "--out",
                 str(where / "target")]) != 0:
            raise SystemExit(f"{domain} target build failed")
    return Target(domain, where / "data", where / "target/reference.jsonl", where / "target/heldout.jsonl", domain)


# ---------------------------------------------------------------- one run (in a worker process)


def cell_config(cell: Cell, target: Target, out: Path, budget: Budget) -> Any:
    """The cell's resolved training configuration: what identifies its run."""
    from dwm.run import load_config, recipe_path

    run = out / cell.key
    plain = cell.arm == "uniform" or cell.arm.startswith(("static:", "inbatch:"))
    recipe = cell.recipe or ("cpu-small-uniform" if plain else "cpu-small-dwm")
    steps = budget.steps
    ov = [f"data.dir={target.data}", f"out={run}", f"model.spec={budget.preset}", f"train.max_steps={steps}",
          f"train.seed={cell.seed}",
          f"train.global_batch_tokens={budget.batch_tokens}", f"optim.warmup_steps={max(1, steps // 10)}",
          f"weighting.reference={target.reference}", "log.progress=false", f"checkpoint.every={steps}",
          *cell.overrides]
    if cell.arm.startswith("static:"):  # the manifest itself is written by run_cell
        ov.append(f"data.selection={run / 'mixture.parquet'}")
    if cell.arm.startswith("inbatch:"):  # the target's domain weighted by v within each batch, same stream as uniform
        ov += ["weighting.mode=domains", f"weighting.domain_weights={target.domain}={cell.arm.split(':')[1]}"]
    return load_config(recipe_path(recipe), ov)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _path_keys() -> tuple[str, ...]:
    """The input paths of a run config (dwm.run's list, which `dwm train` stores absolute), not the output dir."""
    from dwm.run import PATH_KEYS as RUN_KEYS

    return tuple(k for k in RUN_KEYS if k != "out")


def _normalised(flat: dict[str, Any]) -> dict[str, Any]:
    """Without the output directory, and with the input paths absolute (relative ones are relative to the
    repository, where the benchmark runs): `--out benchmarks/out/x` and `--out $PWD/benchmarks/out/x` are the
    same runs."""
    flat = {k: v for k, v in flat.items() if k != "out"}
    for k in _path_keys():
        if isinstance(flat.get(k), str) and flat[k]:
            flat[k] = str((REPO / flat[k]).resolve())
    return flat


def identity(cfg: Any) -> dict[str, Any]:
    """What identifies a run: its resolved configuration, flattened, without the output directory and with its
    input paths absolute (`_normalised`)."""
    from dwm.config import to_dict

    return _normalised(_flat(to_dict(cfg)))


def _renamed(flat: dict[str, Any]) -> dict[str, Any]:
    """An older config's keys under their current names ([weighting] keys moved to [weighting.advanced])."""
    from dwm.weighting.config import WeightingConfig

    moved = {f"weighting.{k}": f"weighting.{v}" for k, v in WeightingConfig.MOVED.items()}
    return {moved.get(k, k): v for k, v in flat.items()}


def same_run(config_toml: Path, cfg: Any) -> bool:
    """Whether the finished run whose config.toml this is trained with `cfg`. A key the older file lacks counts as
    equal when `cfg` holds its default: options are added with defaults that keep the earlier behaviour; a key
    that has moved counts under its new name."""
    import tomllib

    old = _normalised(_renamed(_flat(tomllib.loads(config_toml.read_text()))))
    new, default = identity(cfg), identity(type(cfg)())
    return old.keys() <= new.keys() and all(old.get(k, default.get(k)) == v for k, v in new.items())


def cached_run(cell: Cell, cfg: Any, out: Path) -> Path | None:
    """A finished run with this configuration: the cell's own, else any other cell's of the same target (training
    is deterministic given the configuration, so it is the same run), else None."""
    own = out / cell.key
    finished = [d for d in [own, *sorted((out / cell.target).glob("*"))]
                if (d / "result.json").is_file() and (d / "config.toml").is_file()]
    return next((d for d in finished if same_run(d / "config.toml", cfg)), None)


def domain_share(run: Path, domain: str) -> float | None:
    """The domain's mean share of the trained loss over the run's logged steps (under resampling: its fraction of
    the trained samples); None for runs that log no weights (uniform, static)."""
    from dwm.analysis.runs import trained_shares

    shares = trained_shares(run)
    return shares.get(domain, 0.0) if shares else None


def write_static_manifest(cell: Cell, target: Target, run: Path, budget: Budget) -> None:
    """A `static:<share>` cell's selection manifest (run/mixture.parquet): the budget's samples with the target's
    domain at that share, drawn with the cell's seed."""
    from dwm.data.dataset import PreparedData
    from dwm.data.mixture import mixture_ids, write_manifest

    data = PreparedData(target.data, "train")
    n = budget.steps * budget.batch_tokens // data.seq_len
    ids = mixture_ids(data.domain_ids, data.domains, {target.domain: float(cell.arm.split(":")[1])}, n,
                      seed=cell.seed)
    write_manifest(ids, run / "mixture.parquet")


def run_cell(cell: Cell, target: Target, out: Path, budget: Budget) -> dict:
    """Train one arm and evaluate it, or reuse a finished run with the same configuration; returns its record.
    A cached run of this cell whose configuration no longer matches (the recipe's defaults changed) is kept aside
    as KEY.stale-TIME, never overwritten."""
    import torch

    from dwm.config import to_toml

    torch.set_num_threads(int(os.environ.get("DWM_BENCH_THREADS", "1")))
    run = out / cell.key
    cfg = cell_config(cell, target, out, budget)
    hit = cached_run(cell, cfg, out)
    if hit == run:
        return json.loads((run / "result.json").read_text())
    import shutil

    if (run / "result.json").is_file() and (run / "config.toml").is_file():
        stale = run.with_name(f"{run.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.rmtree(stale, ignore_errors=True)
        run.rename(stale)
        print(f"[bench] {cell.key}: the cached run has another configuration; kept as {stale.name}",
              file=sys.stderr, flush=True)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    if hit is not None:
        result = json.loads((hit / "result.json").read_text())
        result.update(arm=cell.arm, seed=cell.seed, overrides=cell.overrides, same_run_as=hit.name)
        result.setdefault("target_share", domain_share(hit, target.domain))
        (run / "config.toml").write_text(to_toml(cfg))
        (run / "result.json").write_text(json.dumps(result, indent=1))
        print(f"[bench] {cell.key}: same configuration as {hit.name}, reused", file=sys.stderr, flush=True)
        return result
    from dwm.eval.cli import evaluate_run
    from dwm.eval.lambada import passage_loss
    from dwm.metrics import read_metrics
    from dwm.run import build_trainer

    if cell.arm.startswith("static:"):
        write_static_manifest(cell, target, run, budget)
    trainer = build_trainer(cfg)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    recs = list(read_metrics(run / "metrics.jsonl"))
    probe_s = sum(r.get("probe_seconds", 0.0) for r in recs if r.get("event") == "stage")
    model = trainer.model.eval()
    res = evaluate_run(run, target=target.heldout, write=True)
    result = {"target": cell.target, "arm": cell.arm, "seed": cell.seed, "overrides": cell.overrides,
              "train_seconds": seconds - probe_s, "probe_seconds": probe_s,
              "heldout_passage_loss": res["lambada"]["passage_loss"], "lambada_acc": res["lambada"]["acc"],
              "lambada_ppl": res["lambada"]["perplexity"],
              "reference_passage_loss": passage_loss(model, trainer.tokenizer, target.reference),
              "val_loss": {d: r["loss"] for d, r in res["heldout"]["per_domain"].items()},
              "val_loss_all": res["heldout"]["overall"]["loss"],
              "bilevel_updates": sum(1 for r in recs if r.get("event") == "bilevel"),
              "target_share": domain_share(run, target.domain),
              "last_stage_weights": next((r["probe_weight_by_domain"] for r in reversed(recs)
                                          if r.get("event") == "stage"), None)}
    (run / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_all(cells: list[Cell], targets: dict[str, Target], out: Path, budget: Budget,
            jobs: int) -> dict[str, dict]:
    """Every cell's result: reused where a finished run has its configuration, else trained, `jobs` at a time
    (cells that share a configuration train once)."""
    cfgs = {c.key: cell_config(c, targets[c.target], out, budget) for c in cells}
    ids = {c.key: json.dumps(identity(cfgs[c.key]), sort_keys=True, default=str) for c in cells}
    seen: set[str] = set()
    todo = [c for c in cells if cached_run(c, cfgs[c.key], out) is None
            and not (ids[c.key] in seen or seen.add(ids[c.key]))]
    print(f"[bench] {len(cells)} runs, {len(todo)} to train ({jobs} at a time)", file=sys.stderr, flush=True)
    results: dict[str, dict] = {}
    if jobs > 1 and todo:
        import multiprocessing as mp

        from dwm.host import die_with_parent

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=die_with_parent) as ex:
            futs = {c.key: ex.submit(run_cell, c, targets[c.target], out, budget) for c in todo}
            for key, f in futs.items():
                results[key] = f.result()
                print(f"[bench] done {key}: heldout {results[key]['heldout_passage_loss']:.4f}, reference "
                      f"{results[key]['reference_passage_loss']:.4f}", file=sys.stderr, flush=True)
    for c in cells:  # the rest: cached, or (jobs = 1) trained here
        if c.key not in results:
            results[c.key] = run_cell(c, targets[c.target], out, budget)
    return results


# ---------------------------------------------------------------- figures


def mse(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def per_seed(xs: list[float]) -> str:
    """' [x0, x1, ...]' rounded to 3 digits, or nothing for a single seed (its mean is the value)."""
    return f" {[round(x, 3) for x in xs]}" if len(xs) > 1 else ""


def fmt(xs: list[float], digits: int = 4) -> str:
    m, se = mse(xs)
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def arm_results(results: dict[str, dict], target: str, arm: str, seeds: list[int]) -> list[dict]:
    return [results[Cell(target, arm, s).key] for s in seeds]


def best_static(results: dict[str, dict], t: Target, seeds: list[int]) -> str:
    """The oracle: the grid mixture with the lowest mean *reference* passage loss (never chosen on heldout)."""
    arms = [f"static:{g}" for g in t.grid]
    return min(arms, key=lambda a: statistics.fmean(r["reference_passage_loss"]
                                                    for r in arm_results(results, t.name, a, seeds)))


def report_target(results: dict[str, dict], t: Target, seeds: list[int], budget: Budget,
                  oseeds: list[int], inbatch: tuple[float, ...] = ()) -> str:
    uni = arm_results(results, t.name, "uniform", seeds)
    dwm = arm_results(results, t.name, "dwm", seeds)
    oracle_arm = best_static(results, t, oseeds)
    orc = arm_results(results, t.name, oracle_arm, seeds)
    key = "heldout_passage_loss"
    diffs = [d[key] - u[key] for d, u in zip(dwm, uni, strict=True)]
    gaps = [u[key] - o[key] for u, o in zip(uni, orc, strict=True)]
    dm, dse = mse(diffs)
    share = -dm / statistics.fmean(gaps) if statistics.fmean(gaps) > 0 else float("nan")
    cost = [d["train_seconds"] / u["train_seconds"] for d, u in zip(dwm, uni, strict=True)]
    lines = [(f"### target `{t.name}` (oracle grid over `{t.domain}`'s share {list(t.grid)}; best on the reference "
             f"side of seeds {oseeds}: `{oracle_arm}`), {budget}, seeds {seeds}"), "",
             "| arm | heldout passage loss | reference passage loss | LAMBADA ppl | val loss (all domains) |",
             "|---|---|---|---|---|"]
    for name, rs in (("uniform", uni), ("DWM (defaults)", dwm), (f"oracle `{oracle_arm}`", orc),
                     *((f"`static:{g}` (seeds {oseeds})", arm_results(results, t.name, f"static:{g}", oseeds))
                       for g in t.grid
                       if f"static:{g}" != oracle_arm),
                     *((f"in-batch oracle: `{t.domain}` x {v:g}", arm_results(results, t.name, f"inbatch:{v:g}", seeds))
                       for v in inbatch)):
        lines.append(f"| {name} | {fmt([r[key] for r in rs])} | {fmt([r['reference_passage_loss'] for r in rs])} | "
                     f"{fmt([r['lambada_ppl'] for r in rs], 1)} | {fmt([r['val_loss_all'] for r in rs])} |")
    lines += ["", (f"- paired difference DWM - uniform (heldout passage loss) per seed: "
                  f"{[round(x, 4) for x in diffs]}; mean {dm:+.4f} ± {dse:.4f} (s.e.), "
                  f"{abs(dm) / dse if dse > 0 else float('inf'):.1f} s.e.; DWM below uniform in "
                  f"{sum(x < 0 for x in diffs)} of {len(diffs)} seeds"),
              f"- uniform -> oracle gap: {fmt(gaps)}; DWM recovers **{100 * share:.0f}%** of it",
              *(inbatch_line(results, t, v, uni, gaps, seeds) for v in inbatch),
              (f"- whole-run cost DWM / uniform (train wall time, 1 thread each; side by side only where the two "
               f"runs were trained together): {[round(c, 3) for c in cost]}, median {statistics.median(cost):.3f} "
               f"(probe scoring excluded: {fmt([d['probe_seconds'] for d in dwm], 1)} s)")]
    share_t = [d.get("target_share") for d in dwm]
    if all(x is not None for x in share_t):
        from dwm.data.dataset import PreparedData

        data = PreparedData(t.data, "train")
        corpus = float((data.domain_ids == data.domains.index(t.domain)).mean())
        lines.append(f"- `{t.domain}`'s share of DWM's trained loss (mean of the logged steps) per seed: "
                     f"{[round(x, 3) for x in share_t]}; its share of the training corpus {corpus:.3f}")
    w = [d["last_stage_weights"] for d in dwm if d["last_stage_weights"]]
    if w:
        doms = sorted(w[0])
        mean_w = {d: statistics.fmean(x[d] for x in w) for d in doms}
        order = sorted(doms, key=lambda d: -mean_w[d])
        ranks = [sorted(x, key=lambda d: -x[d]).index(t.domain) + 1 for x in w]
        lines.append("- last-stage mean probe weight per domain (mean over seeds): "
                     + ", ".join(f"{d} {mean_w[d]:.3f}" for d in order)
                     + f"; `{t.domain}` ranks {ranks} (per seed)")
    doms = sorted(uni[0]["val_loss"])
    lines += ["", "per-domain held-out (val split) loss, mean over seeds:", "",
              "| domain | uniform | DWM | oracle |", "|---|---|---|---|"]
    for d in doms:
        lines.append(f"| {d} | " + " | ".join(f"{statistics.fmean(r['val_loss'][d] for r in rs):.4f}"
                                               for rs in (uni, dwm, orc)) + " |")
    return "\n".join(lines)


def inbatch_line(results: dict[str, dict], t: Target, v: float, uni: list[dict], gaps: list[float],
                 seeds: list[int]) -> str:
    """The in-batch oracle against uniform: what weighting the target's domain by v within every batch (same
    stream) gains, i.e. how much of the static mixture's gap in-batch weights can reach at this budget."""
    key = "heldout_passage_loss"
    d = [r[key] - u[key] for r, u in zip(arm_results(results, t.name, f"inbatch:{v:g}", seeds), uni, strict=True)]
    m, se = mse(d)
    return (f"- in-batch oracle (`{t.domain}` x {v:g} in every batch, hand-set) - uniform per seed: "
            f"{[round(x, 4) for x in d]}; mean {m:+.4f} ± {se:.4f}; {100 * -m / statistics.fmean(gaps):.0f}% of "
            f"the static gap")


def ablation_rows(part: str, only: list[str] | None = None) -> dict[str, list[str]]:
    """The rows of an ablation table (name -> overrides), its baseline first; `only`: just the rows whose name
    starts with one of these prefixes (and the baseline). A prefix no row has is a one-line error."""
    rows = ({"**shipped defaults**": [], **ABLATIONS} if part == "ablation" else
            {"**in-batch-weights defaults**": WEIGHTS_DEFAULTS, **ABLATIONS_FROM_WEIGHTS})
    if not only:
        return rows
    names = list(rows)
    for prefix in only:
        if not any(n.startswith(prefix) for n in names[1:]):
            close = difflib.get_close_matches(prefix, [n.split(" (")[0] for n in names[1:]], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; rows: {[n.split(' (')[0] for n in names[1:]]}"
            raise SystemExit(f"bench_dwm.py: --rows {prefix!r} is no row of --part {part}{hint}")
    return {n: ov for i, (n, ov) in enumerate(rows.items()) if i == 0 or any(n.startswith(p) for p in only)}


def report_ablation(results: dict[str, dict], t: Target, seeds: list[int], oseeds: list[int], part: str,
                    rows: dict[str, list[str]] | None = None, oracle: bool = True) -> str:
    """The lever table on the reference side; without the oracle (--no-oracle) the share column is left empty."""
    rows = rows if rows is not None else ablation_rows(part)
    uni = arm_results(results, t.name, "uniform", seeds)
    key = "reference_passage_loss"
    gap = math.nan
    title = f"### ablation on `{t.name}`, reference side (the signal defaults are picked on), seeds {seeds}; "
    if oracle:
        oracle_arm = best_static(results, t, oseeds)
        orc = arm_results(results, t.name, oracle_arm, seeds)
        gap = statistics.fmean(u[key] - o[key] for u, o in zip(uni, orc, strict=True))
        title += f"uniform -> oracle (`{oracle_arm}`) gap {gap:.4f}"
    else:
        title += "no oracle trained (--no-oracle): shares need a gap measured elsewhere"
    lines = [title]
    head = ["", ("| lever | reference loss - uniform (paired) | share of gap | heldout loss - uniform | "
                 "cost / uniform |"), "|---|---|---|---|---|"]

    def row(name: str, arm: str) -> str:
        rs = arm_results(results, t.name, arm, seeds)
        d = [r[key] - u[key] for r, u in zip(rs, uni, strict=True)]
        h = [r["heldout_passage_loss"] - u["heldout_passage_loss"] for r, u in zip(rs, uni, strict=True)]
        c = [r["train_seconds"] / u["train_seconds"] for r, u in zip(rs, uni, strict=True)]
        share = f"{100 * -statistics.fmean(d) / gap:.0f}%" if oracle else "—"
        return (f"| {name} | {fmt(d)}{per_seed(d)} | {share} | {fmt(h)}{per_seed(h)} | "
                f"{statistics.median(c):.2f} |")

    lines += ["", ("One change from the shipped defaults:" if part == "ablation" else
                   "One change from the in-batch-weights defaults (shipped until 7faa313):"), *head,
              *(row(name, f"ablation:{name}") for name in rows)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["main", "second", "ablation", "ablation-weights", "all"], default="all",
                   help="which comparison to run (all = main, second, ablation; ablation-weights is the lever table "
                        "of the in-batch-weights defaults shipped until 7faa313)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (paired across arms)")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None, help="seeds of the ablation rows "
                                                                                "(default: --seeds)")
    p.add_argument("--oracle-seeds", type=int, nargs="+", default=None,
                   help="seeds the oracle grid is trained on (default: --seeds); the share chosen there on the "
                        "reference side is then trained on every seed")
    p.add_argument("--oracle-grid", type=float, nargs="+", default=None, metavar="SHARE",
                   help="shares of the target-like domain in the oracle grid (default 0.25 0.5 1.0); one share "
                        "reuses a choice made at another budget instead of choosing again")
    p.add_argument("--inbatch-oracle", type=float, nargs="+", default=(), metavar="V",
                   help="also train the in-batch oracle: the target's domain weighted by V within every batch "
                        "(weighting.mode = domains, the same stream as uniform), on every seed of main/second")
    p.add_argument("--preset", default="cpu-small", help="model preset of every run (cpu-mini: the demo's model)")
    p.add_argument("--steps", type=int, default=150, help="LM steps per run")
    p.add_argument("--batch-tokens", type=int, default=4096, help="global batch in tokens")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time (1 torch thread each)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "dwm", help="run cache")
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help="train only these arms now (uniform, dwm, static, ablation) and print nothing: fills the "
                        "cache, e.g. the baselines before the DWM defaults are settled")
    p.add_argument("--ablation-target", choices=["novels", "speech"], default="novels",
                   help="the target of --part ablation / ablation-weights (default novels)")
    p.add_argument("--rows", nargs="+", default=None, metavar="PREFIX",
                   help="ablation rows to run: those whose name starts with a PREFIX (the defaults' row always)")
    p.add_argument("--no-oracle", action="store_true",
                   help="ablation parts only: train no static mixture (the share column stays empty); for levers "
                        "compared on new seeds against a gap measured before")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not all(v > 0 for v in args.inbatch_oracle):
        p.error(f"--inbatch-oracle: weights must be > 0, got {args.inbatch_oracle}")
    if args.oracle_grid and not all(0 < g <= 1 for g in args.oracle_grid):
        p.error(f"--oracle-grid: shares must be in (0, 1], got {args.oracle_grid}")
    parts = ["main", "second", "ablation"] if args.part == "all" else [args.part]
    if args.no_oracle and not all(part.startswith("ablation") for part in parts):
        p.error("--no-oracle: only with --part ablation or ablation-weights (main and second report the oracle)")
    # bad options are refused before the data is prepared (minutes on a fresh cache)
    rows = {part: ablation_rows(part, args.rows) for part in parts if part.startswith("ablation")}
    budget = Budget(args.steps, args.batch_tokens, args.preset)
    targets = prepare_targets(args.out)
    if args.oracle_grid:
        for t in targets.values():
            t.grid = tuple(args.oracle_grid)

    def target_of(part: str) -> Target:
        if part.startswith("ablation"):
            return targets[args.ablation_target]
        return targets["speech" if part == "second" else "novels"]

    abl_seeds = args.ablation_seeds or args.seeds
    oseeds = args.oracle_seeds or args.seeds
    # phase 1: the oracle grid on its seeds (first, so it is ready early) and every other arm
    cells: list[Cell] = []
    for part in parts:
        if not args.no_oracle:
            t = target_of(part)
            cells += [Cell(t.name, f"static:{g}", s) for s in oseeds for g in t.grid]
    for part in parts:
        t = target_of(part)
        for s in abl_seeds if part.startswith("ablation") else args.seeds:
            cells += [Cell(t.name, "uniform", s), Cell(t.name, "dwm", s)]
            if part.startswith("ablation"):
                cells += [Cell(t.name, f"ablation:{n}", s, ov) for n, ov in rows[part].items()]
            else:
                cells += [Cell(t.name, f"inbatch:{v:g}", s) for v in args.inbatch_oracle]
    seen: set[str] = set()
    cells = [c for c in cells if not (c.key in seen or seen.add(c.key))]
    if args.arms:
        cells = [c for c in cells if c.arm.split(":")[0] in args.arms]
        run_all(cells, targets, args.out, budget, args.jobs)
        return 0
    results = run_all(cells, targets, args.out, budget, args.jobs)
    # phase 2: the mixture chosen on the reference side of the oracle seeds, on every seed
    more = []
    for part in parts:
        if args.no_oracle:
            continue
        t = target_of(part)
        best = best_static(results, t, oseeds)
        more += [Cell(t.name, best, s) for s in (abl_seeds if part.startswith("ablation") else args.seeds)]
    more = [c for c in more if not (c.key in seen or seen.add(c.key))]
    results.update(run_all(more, targets, args.out, budget, args.jobs))
    text = []
    for part in parts:
        t = target_of(part)
        if part.startswith("ablation"):
            text.append(report_ablation(results, t, abl_seeds, oseeds, part, rows[part], not args.no_oracle))
        else:
            text.append(report_target(results, t, args.seeds, budget, oseeds, tuple(args.inbatch_oracle)))
    out = "\n\n".join(text)
    print(out)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(f"\n<!-- {time.strftime('%Y-%m-%d %H:%M')} bench_dwm.py {' '.join(sys.argv[1:])} -->\n{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
