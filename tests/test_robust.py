"""Nothing lost, nothing silent: SIGTERM / SIGINT save a checkpoint and resume bit-identically, a killed or failed
checkpoint write leaves the previous one, a full disk is one line, resumes and overwrites are guarded, tokenizers
are checked, overrides stand anywhere, long documents are tokenized in pieces, and the quiet failures warn."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dwm.cli import main
from dwm.errors import UserError
from dwm.run import build_trainer, load_config
from dwm.testing import make_synthetic_prepared
from dwm.train.callbacks import Callback
from dwm.train.trainer import PREEMPTED_EXIT, Preempted, Trainer
from dwm.train.weighter import Weighter

STEPS = 8


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


class SignalDuringStep(Weighter):
    """Random weights (the global RNG: resume must restore it) and, while computing step `at`'s weights, sends
    `sig` to this process: the signal lands in the middle of an optimizer step."""

    def __init__(self, at: int | None = None, sig: int = signal.SIGTERM):
        super().__init__()
        self.at, self.sig, self.step = at, sig, -1

    def before_step(self, ctx, step):
        self.step = step

    def weights(self, batch, losses=None):
        if self.step == self.at:
            os.kill(os.getpid(), self.sig)
        return torch.rand(len(batch)) * 2


# ------------------------------------------------------------------ preemption


def test_sigterm_at_5_random_steps_resumes_bit_identically(make_cfg, tmp_path):
    """SIGTERM in the middle of a random step, 5 times: the step finishes, its checkpoint is written, train()
    returns with stopped_by, and --resume ends with the very parameters of an uninterrupted run."""
    cfg = ("train.max_steps=8", "checkpoint.every=3")
    full = Trainer(make_cfg(*cfg, out=tmp_path / "full"), weighter=SignalDuringStep())
    full.train()
    want = params(full.model)
    before = signal.getsignal(signal.SIGTERM)
    rng = random.Random(1234)
    tries = sorted(rng.sample(range(STEPS - 1), 5))  # 0-based step indices, in the middle of which SIGTERM lands
    ok = 0
    for k in tries:
        out = tmp_path / f"k{k}"
        part = Trainer(make_cfg(*cfg, out=out), weighter=SignalDuringStep(at=k))
        with pytest.raises(Preempted):
            part.train()
        assert part.stopped_by == "SIGTERM" and part.step == k + 1, (k, part.step)
        assert (out / "checkpoints" / "LATEST").read_text().strip() == f"step_{k + 1:08d}"
        events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert {"step": k + 1, "event": "preempted", "signal": "SIGTERM"} in events
        assert signal.getsignal(signal.SIGTERM) is before  # handlers restored after train()
        torch.rand(7)  # disturb the RNG: the checkpoint's state must win
        resumed = Trainer(make_cfg(*cfg, out=out), resume=True, weighter=SignalDuringStep())
        assert resumed.step == k + 1
        resumed.train()
        assert resumed.stopped_by is None
        assert_same(params(resumed.model), want)
        ok += 1
    assert ok == 5


@pytest.fixture
def ctrl_c():
    """SIGINT as in an interactive shell (a background job's ignores it, and an ignored signal stays ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_also_saves(make_cfg, tmp_path, ctrl_c):
    tr = Trainer(make_cfg("train.max_steps=6", out=tmp_path / "r"), weighter=SignalDuringStep(2, signal.SIGINT))
    with pytest.raises(Preempted, match="stopped by SIGINT after step 3"):
        tr.train()
    assert tr.stopped_by == "SIGINT" and tr.step == 3
    assert (tmp_path / "r" / "checkpoints" / "LATEST").read_text().strip() == "step_00000003"


@pytest.fixture(scope="module")
def dwm_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("robust_dwm")
    make_synthetic_prepared(root / "data", n_train=96, n_val=16, seq_len=32, vocab_size=300, domains=("a", "b", "c"))
    from tokenizers import Tokenizer

    from dwm.data.dataset import PreparedData

    tok = Tokenizer.from_file(str(root / "data" / "tokenizer.json"))
    val = PreparedData(root / "data", "val")
    with open(root / "ref.jsonl", "w") as f:
        f.writelines(json.dumps({"text": tok.decode(val.tokens[i, : val.n_tokens[i]].tolist())[:160]}) + "\n"
                     for i in range(12))
    return {"data": root / "data", "ref": root / "ref.jsonl"}


def _dwm_cfg(d: dict[str, Path], out: Path):
    return load_config(None, [
        f"data.dir={d['data']}", f"out={out}", "model.spec=tiny", "train.global_batch_tokens=256",
        "train.micro_batch_size=4", "train.max_steps=10", f"weighting.reference={d['ref']}", "weighting.mode=dwm",
        "weighting.net.width=32", "weighting.net.heads=2", "weighting.probe_size=30", "weighting.advanced.ref_batch_size=4",
        "weighting.advanced.lr=0.01", "weighting.schedule=interleaved", "weighting.interval=2", "weighting.apply=resample",
        "weighting.advanced.batch_size=12", "weighting.advanced.phi_steps=2", "log.progress=false", "log.every=1", "checkpoint.every=4",
        "train.device=cpu"])


class SignalAfter(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, ctx, metrics):
        if ctx.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_dwm_sigterm_mid_stage_resumes_bit_identically(dwm_data, tmp_path):
    full = build_trainer(_dwm_cfg(dwm_data, tmp_path / "full"))
    full.train()
    part = build_trainer(_dwm_cfg(dwm_data, tmp_path / "part"), callbacks=[SignalAfter(5)])
    with pytest.raises(Preempted):
        part.train()
    assert part.stopped_by == "SIGTERM" and part.step == 5
    assert (tmp_path / "part" / "checkpoints" / "LATEST").read_text().strip() == "step_00000005"
    resumed = build_trainer(_dwm_cfg(dwm_data, tmp_path / "part"), resume=True)
    assert resumed.step == 5
    resumed.train()
    assert_same(params(resumed.model), params(full.model))
    for k in range(len(list((tmp_path / "full" / "weighting").glob("stage_*.safetensors")))):
        a = load_file(str(tmp_path / "full" / "weighting" / f"stage_{k}.safetensors"))
        b = load_file(str(tmp_path / "part" / "weighting" / f"stage_{k}.safetensors"))
        assert_same(a, b)


class KilledInSave(BaseException):
    """Stands for a SIGKILL in the middle of torch.save: nothing after it runs (no except/finally cleanup)."""


def test_kill_during_checkpoint_write_keeps_previous_and_tmp_is_removed(make_cfg, tmp_path, monkeypatch, capsys):
    cfg = ("train.max_steps=6", "checkpoint.every=2")
    full = Trainer(make_cfg(*cfg, out=tmp_path / "full"))
    full.train()
    out = tmp_path / "r"
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"half a checkpoint")
            raise KilledInSave
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr("dwm.train.checkpoint.torch.save", dying_save)
    with pytest.raises(KilledInSave):
        Trainer(make_cfg(*cfg, out=out)).train()
    monkeypatch.undo()
    ck = out / "checkpoints"
    assert (ck / "LATEST").read_text().strip() == "step_00000002"
    assert [p.name for p in ck.iterdir() if p.name.startswith(".tmp_step_00000004")]
    capsys.readouterr()
    tr = Trainer(make_cfg(*cfg, out=out), resume=True)
    assert "removed 1 incomplete checkpoint" in capsys.readouterr().err
    assert tr.step == 2 and not [p for p in ck.iterdir() if p.name.startswith(".")]
    tr.train()
    assert_same(params(tr.model), params(full.model))


def test_full_disk_during_checkpoint_is_one_line(make_cfg, tmp_path, monkeypatch):
    out = tmp_path / "r"
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(f.name))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr("dwm.train.checkpoint.torch.save", full_disk)
    tr = Trainer(make_cfg("train.max_steps=6", "checkpoint.every=2", out=out))
    with pytest.raises(UserError) as e:
        tr.train()
    msg = str(e.value)
    assert "\n" not in msg and "no space left on device" in msg and "step_00000004" in msg
    need = int(msg.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    n_params = sum(p.numel() for p in tr.model.parameters())
    assert need > 3 * 4 * n_params  # weights + AdamW's two moments, float32
    ck = out / "checkpoints"
    assert (ck / "LATEST").read_text().strip() == "step_00000002"
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_cli_sigterm_at_a_random_moment_exits_75_and_resumes_identically(prepared_dir, tmp_path):
    """A real process, SIGTERM from outside at whatever moment the run is in (after its first logged step)."""
    common = [f"data.dir={prepared_dir}", "model.spec=tiny", "train.global_batch_tokens=256",
              "train.micro_batch_size=4", "train.max_steps=60", "checkpoint.every=25", "log.every=1",
              "log.progress=false", "train.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dwm.cli", "train", "--out", str(run), *common], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    Trainer(load_config(None, [*common, f"out={tmp_path / 'ref'}"])).train()  # meanwhile, the reference
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = run / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    time.sleep(random.Random(7).uniform(0, 0.2))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    assert "stopped by SIGTERM" in err and "parameters" in err
    stopped = int((run / "checkpoints" / "LATEST").read_text().strip().removeprefix("step_"))
    assert 1 <= stopped < 60
    r = subprocess.run([sys.executable, "-m", "dwm.cli", "train", "--out", str(run), "--resume"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000060" / "model" / "model.safetensors"))
    wb = load_file(str(run / "checkpoints" / "step_00000060" / "model" / "model.safetensors"))
    assert_same(wa, wb)


# ------------------------------------------------------------------ guarded resumes


def _train_args(prepared_dir, out, *extra):
    return ["train", f"data.dir={prepared_dir}", "model.spec=tiny", "train.global_batch_tokens=256",
            "train.micro_batch_size=4", "train.max_steps=2", "log.progress=false", "train.device=cpu",
            "optim.warmup_steps=1", "--out", str(out), *extra]


def test_resume_refuses_changed_model_or_weighting_with_a_diff(prepared_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_train_args(prepared_dir, out)) == 0
    cfg_before = (out / "config.toml").read_bytes()
    (out / "eval.json").write_text("{}")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "weighting.mode=dwm", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "weighting.mode 'uniform' -> 'dwm'" in err and "--allow-config-change weighting.mode" in err
    assert main(["train", "--out", str(out), "--resume", "model.spec=cpu-mini", "train.max_steps=3"]) == 2
    assert "model.spec 'tiny' -> 'cpu-mini'" in capsys.readouterr().err
    # allowed: the checkpoint still cannot fill another model, one line instead of a size-mismatch traceback
    assert main(["train", "--out", str(out), "--resume", "model.spec=cpu-mini", "train.max_steps=3",
                 "--allow-config-change", "model.spec"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not match model 'cpu-mini'" in err
    assert (out / "config.toml").read_bytes() == cfg_before and (out / "eval.json").is_file()
    # an allowed, harmless change trains on; the stale eval.json is kept aside, not left as if current
    assert main(["train", "--out", str(out), "--resume", "train.max_steps=3", "data.shuffle=false",
                 "--allow-config-change", "data.shuffle"]) == 0
    assert not (out / "eval.json").exists() and (out / "eval.step_00000002.json").is_file()


def test_resume_refuses_another_tokenizer(prepared_dir, tmp_path, capsys):
    other = make_synthetic_prepared(tmp_path / "other", vocab_size=280)
    out = tmp_path / "r"
    assert main(_train_args(prepared_dir, out)) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", f"data.dir={other}", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "data.dir" in err and "tokenizer" in err and "vocab 280" in err and "vocab 300" in err


def test_resume_at_or_past_max_steps_touches_nothing(prepared_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_train_args(prepared_dir, out)) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    for steps in (2, 1):
        assert main(["train", "--out", str(out), "--resume", f"train.max_steps={steps}"]) == 0
        assert "already at step 2" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_run_resumes_from_another_directory(prepared_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.symlink(prepared_dir, tmp_path / "a" / "prep")
    monkeypatch.chdir(tmp_path / "a")
    args = _train_args("prep", "run")
    args[1] = "data.dir=prep"
    assert main(args) == 0
    cfg = load_config(tmp_path / "a" / "run" / "config.toml")
    assert cfg.data.dir == str(tmp_path / "a" / "prep") and cfg.out == str(tmp_path / "a" / "run")
    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--out", "../a/run", "--resume", "train.max_steps=3"]) == 0
    assert (tmp_path / "a" / "run" / "checkpoints" / "LATEST").read_text().strip() == "step_00000003"


def test_overrides_anywhere_summary_and_warmup_warning(prepared_dir, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "model.spec=tiny", "--out", str(out), "train.max_steps=2", f"data.dir={prepared_dir}",
            "--data", str(prepared_dir), "train.global_batch_tokens=256", "train.micro_batch_size=4",
            "log.progress=false", "train.device=cpu", "optim.warmup_steps=5"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warmup_steps 5 > the run's 2 steps" in err
    summary = next(x for x in err.splitlines() if "parameters" in x)
    tr = Trainer(load_config(out / "config.toml", [f"out={tmp_path / 'x'}"]))
    n = sum(p.numel() for p in tr.model.parameters())
    assert f"({n / 1e6:.2f}M parameters)" in summary and "8 samples x 32 = 256 tokens per step" in summary
    assert "accumulation 2" in summary and "steps 0 -> 2" in summary and "cpu" in summary
    assert load_config(out / "config.toml").train.max_steps == 2
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--bogus", "train.max_steps=2"])


# ------------------------------------------------------------------ prepare


def _jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly",
         "hex", "jolly", "boxing", "frogs"]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def tok_path(tmp_path):
    from dwm.data.tokenizer import train_bpe

    rng = random.Random(0)
    tok = train_bpe([_text(rng, 2000)], 300)
    tok.save(str(tmp_path / "tok.json"))
    return tmp_path / "tok.json"


def test_prepare_refuses_another_corpus_without_force(tmp_path, tok_path, capsys):
    rng = random.Random(1)
    a = _jsonl(tmp_path / "web__a.jsonl", [{"id": f"a{i}", "text": _text(rng, 50)} for i in range(20)])
    b = _jsonl(tmp_path / "news__b.jsonl", [{"id": f"b{i}", "text": _text(rng, 50)} for i in range(20)])
    base = ["prepare", "--out", str(tmp_path / "out"), "--tokenizer", str(tok_path), "--seq-len", "16",
            "--no-progress"]
    assert main([*base, str(a)]) == 0
    assert main([*base, str(a), "--seq-len", "32"]) == 0  # the same inputs, other options: redone as before
    capsys.readouterr()
    assert main([*base, str(b)]) == 2
    err = capsys.readouterr().err
    assert "already holds a prepared corpus from other inputs" in err and str(a.resolve()) in err and "--force" in err
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["domains"] == ["web"]
    assert main([*base, str(b), "--force"]) == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["domains"] == ["news"]


def test_prepare_full_disk_is_one_line_and_leaves_no_tmp(tmp_path, tok_path, monkeypatch, capsys):
    rng = random.Random(2)
    a = _jsonl(tmp_path / "web__a.jsonl", [{"id": f"a{i}", "text": _text(rng, 50)} for i in range(20)])

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / ".tmp-prepare" / "x.parquet"))

    monkeypatch.setattr("dwm.data.prepare.SplitWriter._flush_meta", full)
    capsys.readouterr()
    assert main(["prepare", str(a), "--out", str(tmp_path / "out"), "--tokenizer", str(tok_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on device writing" in err and "x.parquet" in err
    assert f"needs about {a.stat().st_size:,} bytes" in err
    assert not (tmp_path / "out" / ".tmp-prepare").exists()


def test_any_command_full_disk_is_one_line(monkeypatch, capsys, tmp_path):
    def boom(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "sel.parquet"))

    monkeypatch.setattr("dwm.selection.cli.run", boom)
    assert main(["select", "--data", str(tmp_path), "--method", "random", "--budget-tokens", "10", "--out",
                 str(tmp_path / "sel.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on device writing" in err and "sel.parquet" in err


def test_long_document_in_pieces_gives_the_same_ids(tmp_path, tok_path, monkeypatch):
    """A document far longer than a piece: the pieces are cut before a space between two words, so the ids are
    those of the whole text (checked against one encode of it), and prepare writes the same rows."""
    from tokenizers import Tokenizer

    from dwm.data import tokenizer as tkz

    rng = random.Random(3)
    text = "".join(_text(rng, 8) + rng.choice([" ", "  ", "\n", ". ", ", ", " 123 ", "\t"]) for _ in range(4000))
    tok = Tokenizer.from_file(str(tok_path))
    whole = tok.encode(text, add_special_tokens=False).ids
    pieces = tkz.split_long(text, 1000)
    assert len(pieces) > 20 and "".join(pieces) == text and max(map(len, pieces)) <= 1000
    monkeypatch.setattr(tkz, "PIECE_CHARS", 1000)
    got = tkz.encode_batch(tok, [text, "short text"])
    assert isinstance(got[0], np.ndarray) and got[0].tolist() == whole
    assert got[1] == tok.encode("short text", add_special_tokens=False).ids
    src = _jsonl(tmp_path / "web__long.jsonl", [{"id": "long", "text": text}, {"id": "s", "text": "a b c"}])
    from dwm.data.prepare import PrepareOptions, prepare

    o = {"tokenizer": str(tok_path), "seq_len": 64, "val_fraction": 0.0, "progress": False}
    prepare([src], tmp_path / "pieces", PrepareOptions(**o))
    monkeypatch.setattr(tkz, "PIECE_CHARS", 1 << 30)
    prepare([src], tmp_path / "whole", PrepareOptions(**o))
    assert (tmp_path / "pieces" / "train.bin").read_bytes() == (tmp_path / "whole" / "train.bin").read_bytes()


def test_prepare_warns_val_split_and_missing_domains(tmp_path, tok_path, capsys):
    from dwm.data.prepare import PrepareOptions, is_val, prepare

    rng = random.Random(4)
    ids = [f"d{i}" for i in range(400)]
    val = [i for i in ids if is_val(i, 0, 0.05)]
    train = [i for i in ids if not is_val(i, 0, 0.05)]
    docs = [{"id": val[0], "text": _text(rng, 40), "src": "email"}]  # the only val document: one domain of four
    docs += [{"id": train[k], "text": _text(rng, 40), "src": d} for k, d in enumerate(["email", "web", "code", "law"])]
    docs += [{"id": train[10], "text": _text(rng, 40)}]  # no domain field
    src = _jsonl(tmp_path / "mixed.jsonl", docs)
    capsys.readouterr()
    prepare([src], tmp_path / "out", PrepareOptions(tokenizer=str(tok_path), seq_len=16, val_fraction=0.05,
                                                    domain_field="src", progress=False))
    err = capsys.readouterr().err
    assert "the val split (1 documents) covers only 1 of 4 domains (email)" in err
    assert "1 records had no --domain-field 'src'" in err


# ------------------------------------------------------------------ tokenizer checks of eval and select


def test_eval_refuses_data_with_another_tokenizer(make_cfg, tmp_path):
    from dwm.eval.cli import evaluate_run

    tr = Trainer(make_cfg("train.max_steps=1", out=tmp_path / "r"))
    tr.train()
    other = make_synthetic_prepared(tmp_path / "other", vocab_size=280)
    with pytest.raises(UserError) as e:
        evaluate_run(tmp_path / "r", data_dir=other, target=None, write=False)
    msg = str(e.value)
    assert "different tokenizers" in msg and "vocab 300" in msg and "vocab 280" in msg
    assert str(tmp_path / "r" / "tokenizer.json") in msg and str(other / "tokenizer.json") in msg
    assert evaluate_run(tmp_path / "r", target=None, write=False)["heldout"]["overall"]["loss"] > 0


def test_select_perplexity_with_a_run_of_another_tokenizer(make_cfg, tmp_path, capsys):
    Trainer(make_cfg("train.max_steps=1", out=tmp_path / "r")).train()
    other = make_synthetic_prepared(tmp_path / "other", vocab_size=280)
    capsys.readouterr()
    rc = main(["select", "--data", str(other), "--method", "perplexity", "--ref-model", str(tmp_path / "r"),
               "--budget-tokens", "200", "--out", str(tmp_path / "sel.parquet")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "differs from the data's" in err and "re-tokenizing" in err
    assert (tmp_path / "sel.parquet").is_file()


# ------------------------------------------------------------------ DDP


def _ddp_worker(rank: int, world: int, port: int, data_dir: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    def cfg(out):
        return load_config(None, [f"data.dir={data_dir}", f"out={out}", "model.spec=tiny",
                                  "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.max_steps=6",
                                  "log.every=1", "log.progress=false", "checkpoint.every=4", "train.device=cpu",
                                  "optim.warmup_steps=1"])

    try:
        full = Trainer(cfg(f"{root}/full"), weighter=SignalDuringStep())
        full.train()
        # SIGTERM reaches rank 1 only, in the middle of step index 1: both ranks must stop after step 2
        part = Trainer(cfg(f"{root}/part"), weighter=SignalDuringStep(at=1 if rank == 1 else None))
        try:
            part.train()
        except Preempted:
            pass
        stopped = (part.step, part.stopped_by)
        resumed = Trainer(cfg(f"{root}/part"), resume=True, weighter=SignalDuringStep())
        resumed.train()
        torch.save({"full": params(full.model), "resumed": params(resumed.model), "stopped": stopped},
                   f"{root}/res.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sigterm_on_one_rank_stops_both_and_resumes_identically(prepared_dir, tmp_path, free_port):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(prepared_dir), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"res.{r}", weights_only=False) for r in (0, 1))
    assert r0["stopped"] == (2, "a stop signal") and r1["stopped"] == (2, "SIGTERM")
    events = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "event": "resume", "checkpoint": "step_00000002"} in events
    for r in (r0, r1):
        assert_same(r["resumed"], r["full"])
    assert_same(r0["resumed"], r1["resumed"])


# ------------------------------------------------------------------ progress and eval's warning


def test_progress_is_a_line_per_interval_in_a_log():
    import io

    from dwm.progress import Progress

    log = io.StringIO()  # not a terminal: lines, no bar
    p = Progress("dwm x: scoring", total=4, unit="shard", interval=0.0, stream=log)
    for _ in range(4):
        p.update(1, docs=10)
    p.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("dwm x: scoring: 4/4 shard, docs 10, ")
    quiet = io.StringIO()
    p = Progress("dwm x", interval=3600.0, stream=quiet)
    p.update(5)
    assert quiet.getvalue() == ""  # within the interval: nothing
    off = io.StringIO()
    Progress("dwm x", interval=0.0, stream=off, enabled=False).update(1)
    assert off.getvalue() == ""


def test_eval_warns_when_val_covers_few_domains(tmp_path, capsys):
    from dwm.eval.cli import evaluate_run

    data = make_synthetic_prepared(tmp_path / "d", n_val=1, domains=("a", "b", "c"))
    cfg = load_config(None, [f"data.dir={data}", f"out={tmp_path / 'r'}", "model.spec=tiny",
                             "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.max_steps=1",
                             "log.progress=false", "train.device=cpu", "optim.warmup_steps=1"])
    Trainer(cfg).train()
    capsys.readouterr()
    res = evaluate_run(tmp_path / "r", target=None, write=False)
    err = capsys.readouterr().err
    (dom,) = res["heldout"]["per_domain"]
    assert f"the val split covers only 1 of 3 domains ({dom})" in err


def test_cli_exit_code_75_and_resume_hint(prepared_dir, tmp_path, capsys):
    from dwm import run as dwm_run
    from dwm.cli import build_parser

    out = tmp_path / "r"
    args = build_parser("train").parse_args(["train", "--out", str(out), f"data.dir={prepared_dir}", "model.spec=tiny",
                                             "train.global_batch_tokens=256", "train.micro_batch_size=4",
                                             "train.max_steps=4", "log.progress=false", "train.device=cpu"])
    assert dwm_run.run(args, callbacks=[SignalAfter(2)]) == PREEMPTED_EXIT == 75
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM after step 2; checkpoint saved; continue with `dwm train --out {out} --resume`" in err
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step_00000004"


class TwoSignals(Weighter):
    """In the middle of step index 1: `first`, then `second` (a launcher forwarding SIGTERM, or Ctrl-C again)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second, self.step = first, second, -1

    def before_step(self, ctx, step):
        self.step = step

    def weights(self, batch, losses=None):
        if self.step == 1:
            os.kill(os.getpid(), self.first)
            os.kill(os.getpid(), self.second)
        return torch.ones(len(batch))


def test_repeated_sigterm_keeps_saving_and_second_ctrl_c_stops_at_once(make_cfg, tmp_path, ctrl_c):
    before = signal.getsignal(signal.SIGINT)
    tr = Trainer(make_cfg("train.max_steps=6", out=tmp_path / "a"), weighter=TwoSignals(signal.SIGINT, signal.SIGTERM))
    with pytest.raises(Preempted):
        tr.train()
    assert tr.step == 2 and (tmp_path / "a" / "checkpoints" / "LATEST").read_text().strip() == "step_00000002"
    tr = Trainer(make_cfg("train.max_steps=6", out=tmp_path / "b"), weighter=TwoSignals(signal.SIGTERM, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt) as e:
        tr.train()
    assert not isinstance(e.value, Preempted) and tr.step == 1
    assert not (tmp_path / "b" / "checkpoints" / "LATEST").exists()
    assert signal.getsignal(signal.SIGINT) is before  # restored
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored SIGINT stays ignored while training
    tr = Trainer(make_cfg("train.max_steps=3", out=tmp_path / "c"), weighter=TwoSignals(signal.SIGINT, signal.SIGINT))
    tr.train()
    assert tr.stopped_by is None and tr.step == 3 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
