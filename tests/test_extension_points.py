"""The trainer's extension points, used as a third party would: a weighter registered from this file and trained
through `dwm train`'s code path, an online selector that drops half of each candidate pool, a weighter that needs
the LM's losses, and the walls between the packages."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from dwm.cli import main
from dwm.data.batch import Batch
from dwm.nn.losses import per_sample_nll
from dwm.train.selector import SELECTORS, OnlineSelector, SelectorConfig, SequentialSelector
from dwm.train.trainer import Trainer
from dwm.train.weighter import WEIGHTERS, Weighter

SRC = Path(__file__).resolve().parents[1] / "src" / "dwm"


class EvenOddWeighter(Weighter):
    """Defined only here: weight 1.5 on even sample ids, 0.5 on odd ones (sum = B when the batch is balanced);
    records what it saw, so the test can check it was the one that trained."""

    name = "evenodd"
    seen: ClassVar[list[list[int]]] = []

    def weights(self, batch: Batch, losses=None) -> torch.Tensor:
        EvenOddWeighter.seen.append(batch.sample_ids.tolist())
        return 1.5 - (batch.sample_ids % 2).float()


class Recorder(Weighter):
    """Uniform weights; records every batch's sample ids and the losses it was handed."""

    def __init__(self, cfg=None, needs_losses: bool = False):
        super().__init__(cfg)
        self.needs_losses = needs_losses
        self.ids: list[list[int]] = []
        self.losses: list[torch.Tensor] = []

    def weights(self, batch: Batch, losses=None) -> torch.Tensor:
        self.ids.append(batch.sample_ids.tolist())
        if losses is not None:
            self.losses.append(losses.clone())
        return torch.ones(len(batch))


def test_registered_weighter_trains_through_dwm_train(prepared_dir, tmp_path):
    WEIGHTERS.register("evenodd", EvenOddWeighter)
    EvenOddWeighter.seen = []
    try:
        out = tmp_path / "run"
        rc = main(["train", "--data", str(prepared_dir), "--out", str(out), "--weighting", "evenodd",
                   "model.spec=tiny", "train.global_batch_tokens=256", "train.micro_batch_size=4",
                   "train.max_steps=3", "log.progress=false", "log.every=1", "train.device=cpu", "checkpoint.every=0",
                   "data.shuffle=false"])
    finally:
        WEIGHTERS.unregister("evenodd")
    assert rc == 0
    assert EvenOddWeighter.seen == [list(range(s * 8, (s + 1) * 8)) for s in range(3)]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in recs if "loss" in r]
    assert len(losses) == 3 and all(r["loss"] != pytest.approx(r["loss_mean"], abs=1e-7) for r in losses)
    assert 'mode = "evenodd"' in (out / "config.toml").read_text()


def test_unknown_weighter_is_one_line_with_hint(prepared_dir, tmp_path, capsys):
    rc = main(["train", "--data", str(prepared_dir), "--out", str(tmp_path / "r"), "--weighting", "unifrom",
               "train.max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "did you mean uniform?" in err


class DropOddHalf(OnlineSelector):
    """Keeps half of each candidate pool: even sample ids first, then (if the pool has fewer than half even ids)
    the earliest odd ones; ties by stream order."""

    calls = 0

    def score(self, ctx, ids):
        DropOddHalf.calls += 1
        return -(ids % 2).astype(float) - 1e-6 * np.arange(len(ids))


def test_online_selector_trains_on_exactly_the_kept_samples(make_cfg, tmp_path):
    cfg = make_cfg("train.max_steps=6", "checkpoint.every=0")
    rec = Recorder()
    sel = DropOddHalf(SelectorConfig(mode="drop", every=2, candidates=2.0))
    tr = Trainer(cfg, weighter=rec, selector=sel)
    tr.train()
    G = tr.plan.global_batch_size
    seq = SequentialSelector()
    seq.attach(tr.ctx)
    expected = []
    for chunk in range(3):  # 6 steps, a new pool every 2 steps
        pool = seq.stream(chunk * 4 * G, 4 * G)  # candidates = 2 x (2 steps x G)
        order = np.argsort((pool % 2) + 1e-6 * np.arange(len(pool)), kind="stable")[: 2 * G]
        kept = pool[np.sort(order)]
        expected += [kept[:G].tolist(), kept[G:].tolist()]
    assert rec.ids == expected
    assert DropOddHalf.calls == 3
    for chunk in range(3):  # each pool of 4G candidates: the LM saw 2G of them, the rest never reached it
        pool = seq.stream(chunk * 4 * G, 4 * G).tolist()
        got = rec.ids[2 * chunk] + rec.ids[2 * chunk + 1]
        assert len(got) == len(pool) // 2 and all(i in pool for i in got)
        assert sum(i % 2 for i in got) == max(0, 2 * G - sum(1 - i % 2 for i in pool))
    events = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [e["chunk"] for e in events if e.get("event") == "select"] == [0, 1, 2]


def test_online_selector_resumes_mid_chunk_exactly(make_cfg, tmp_path):
    a = Trainer(make_cfg("train.max_steps=6", out=tmp_path / "a"), weighter=Recorder(),
                selector=DropOddHalf(SelectorConfig(every=3)))
    a.train()
    b = Trainer(make_cfg("train.max_steps=6", "checkpoint.every=2", out=tmp_path / "b"),
                selector=DropOddHalf(SelectorConfig(every=3)))
    b.total_steps = 4  # stop inside the second chunk (steps 3..5)
    b.train()
    rec = Recorder()
    c = Trainer(make_cfg("train.max_steps=6", "checkpoint.every=2", out=tmp_path / "b"), resume=True,
                weighter=rec, selector=DropOddHalf(SelectorConfig(every=3)))
    c.train()
    assert rec.ids == a.weighter.ids[4:]


def test_sequential_selector_is_the_seeded_permutation(make_cfg):
    """The default order, bit-identical to the trainer's before selectors existed."""
    tr = Trainer(make_cfg())
    n, G = len(tr.train_data), tr.plan.global_batch_size
    stream = np.concatenate([np.random.default_rng([0, e]).permutation(n) for e in range(3)])
    for s in range(2 * n // G + 3):
        assert tr.global_indices(s).tolist() == stream[s * G:(s + 1) * G].tolist()
    assert SELECTORS.get("sequential") is SequentialSelector


@pytest.mark.parametrize("micro", [8, 2])
def test_needs_losses_hands_over_the_training_forward_losses(make_cfg, tmp_path, micro):
    """A weighter with needs_losses gets the per-sample losses of the training forward itself (no extra forward),
    and with equal weights the step equals the plain path's."""
    rec = Recorder(needs_losses=True)
    tr = Trainer(make_cfg(f"train.micro_batch_size={micro}", "train.max_steps=2", out=tmp_path / "a"), weighter=rec)
    ref = Trainer(make_cfg(f"train.micro_batch_size={micro}", "train.max_steps=2", out=tmp_path / "b"))
    batch = tr.local_batch(0)
    with torch.no_grad():
        want = per_sample_nll(tr.model(input_ids=batch.input_ids).logits, batch.input_ids, batch.n_tokens)
    calls = []
    orig = tr.model.forward
    tr.model.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    tr.train()
    assert len(calls) == 2 * tr.plan.grad_accum  # one training forward per micro-batch, nothing more
    torch.testing.assert_close(rec.losses[0], want, atol=1e-6, rtol=0)
    ref.train()
    for (k, v), w in zip(tr.model.state_dict().items(), ref.model.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5, msg=k)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("dwm."):
            out.add(node.value.split(":")[0])  # lazy "module:attr" registrations count as imports
    return {m for m in out if m == "dwm" or m.startswith("dwm.")}


def test_walls_between_packages():
    """data knows nothing of training, weighting or selection; training never names the weighting or selection
    packages; evaluation reads no weighting code; selection uses data, train's interfaces and the bi-level
    hypergradient only; analysis reads run directories, not the training or weighting code; and no two dwm
    modules import each other."""
    mods = {".".join(p.relative_to(SRC.parent).with_suffix("").parts): p for p in SRC.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in mods} for m, p in mods.items()}
    for m, deps in graph.items():
        if m.startswith("dwm.data"):
            assert not {d for d in deps if d.startswith(("dwm.train", "dwm.weighting", "dwm.eval",
                                                          "dwm.selection", "dwm.analysis"))}, m
        if m.startswith("dwm.train"):
            assert not {d for d in deps if d.startswith(("dwm.weighting", "dwm.eval", "dwm.run",
                                                          "dwm.selection", "dwm.analysis"))}, m
        if m.startswith("dwm.selection"):  # data, nn (the hypergradient) and train's interfaces only
            assert not {d for d in deps if d.startswith(("dwm.eval", "dwm.run", "dwm.demo", "dwm.weighting"))}, m
        if m.startswith("dwm.eval"):  # the loss it shares with training lives in dwm.nn
            assert not {d for d in deps if d.startswith(("dwm.weighting", "dwm.train", "dwm.selection"))}, m
        if m.startswith(("dwm.nn", "dwm.rundir")):  # the shared bottom layer: data, config and errors at most
            assert not {d for d in deps if not d.startswith(("dwm.nn", "dwm.data", "dwm.errors", "dwm.config"))}, m
        if m.startswith("dwm.analysis"):  # reads run directories and prepared data, not the code that wrote them
            assert not {d for d in deps if d.startswith(("dwm.weighting", "dwm.train", "dwm.eval", "dwm.run"))}, m
    cycles = sorted((a, b) for a in graph for b in graph[a] if a in graph.get(b, ()) and a < b)
    assert cycles == []


def _registered_names() -> tuple[set[str], set[str]]:
    """The weighters and selectors registered outside train (their names as a config would write them, their
    classes' names)."""
    import dwm.run  # noqa: F401  (registers the built-in weighters and selectors)
    from dwm.train.selector import SELECTORS
    from dwm.train.weighter import WEIGHTERS

    own = {"uniform", "sequential"}  # train's own
    names = (set(WEIGHTERS.names()) | set(SELECTORS.names())) - own
    classes = {WEIGHTERS.get(n).__name__ for n in WEIGHTERS.names() if n not in own}
    classes |= {SELECTORS.get(n).__name__ for n in SELECTORS.names() if n not in own}
    return names, classes


def test_data_train_eval_know_no_weighter_or_selector_by_name():
    """data, train and eval never compare a mode with a registered weighter's or selector's name, nor name their
    classes: they reach them through the registries and interfaces only."""
    names, classes = _registered_names()
    assert {"dwm", "domains", "influence"} <= names and "ResampleSelector" in classes
    for p in SRC.rglob("*.py"):
        mod = ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
        if not mod.startswith(("dwm.data", "dwm.train", "dwm.eval")):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                consts += [e.value for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                assert not set(consts) & names, (mod, node.lineno, set(consts) & names)
            if isinstance(node, ast.Name | ast.Attribute):
                assert getattr(node, "id", getattr(node, "attr", None)) not in classes, (mod, node.lineno)


def test_no_private_name_crosses_a_module():
    """`from dwm.x import _name` and `module._name` of another dwm module are refused: what a module offers the
    others is its public names."""
    mods = {".".join(p.relative_to(SRC.parent).with_suffix("").parts): p for p in SRC.rglob("*.py")}
    bad = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dwm"):
                bad += [(m, node.module, a.name) for a in node.names if a.name.startswith("_")]
                aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in mods}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("dwm")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append((m, node.value.id, node.attr))
    assert bad == []
