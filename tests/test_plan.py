"""`dwm plan` and the memory check of `dwm train`: counts and FLOPs against hand formulas, the memory breakdown,
fsdp's division, the refusal before step 0, and one-line errors."""

from __future__ import annotations

import pytest

from dwm.cli import main
from dwm.run import load_config
from dwm.train.memory import GIB, model_shape, plan_memory
from dwm.train.model import PRESETS, build_model, count_params

SMALL_RUN = ["model.spec=tiny", "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.max_steps=4",
             "train.device=cpu"]


def hand_matmul_params(spec: str, vocab: int) -> int:
    """q, k, v, o (kv heads = heads), gate/up/down per layer, and the LM head."""
    p = PRESETS[spec]
    return p.layers * (4 * p.hidden * p.hidden + 3 * p.hidden * p.mlp) + p.hidden * vocab


@pytest.mark.parametrize("spec,vocab", [("tiny", 300), ("cpu-mini", 8192)])
def test_parameter_count_is_the_built_models(spec, vocab):
    shape = model_shape(spec, vocab, 32)
    assert shape.n_params == count_params(build_model(spec, vocab, seed=0))
    assert shape.n_matmul == hand_matmul_params(spec, vocab)
    assert shape.layer_params * shape.layers + shape.outer_params == shape.n_params


@pytest.mark.slow
def test_flops_follow_the_hand_formula(prepared_dir):
    from dwm.plan import make_report

    cfg = load_config(None, [*SMALL_RUN, f"data.dir={prepared_dir}"])
    rep = make_report(cfg, gpus=1, gpu_memory_gib=80, mfu=0.5, peak_tflops=100)
    p, V, T = PRESETS["tiny"], rep["plan"].vocab_size, rep["plan"].seq_len
    assert T == 32 and rep["tokens_per_step"] == 256
    per_token = 6 * hand_matmul_params("tiny", V) + 12 * p.layers * p.hidden * T
    assert rep["model_flops_step"] == pytest.approx(256 * per_token, rel=1e-12)
    assert rep["step_s"] == pytest.approx(256 * per_token / (0.5 * 100e12), rel=1e-12)
    assert rep["updates"] == 0 and rep["gpu_hours"] == pytest.approx(4 * rep["step_s"] / 3600, rel=1e-12)
    cfg = load_config(None, [*SMALL_RUN, f"data.dir={prepared_dir}", "train.activation_checkpointing=true"])
    rep = make_report(cfg, gpus=1, gpu_memory_gib=80, mfu=0.5, peak_tflops=100)
    recomputed = 8 * hand_matmul_params("tiny", V) + 16 * p.layers * p.hidden * T
    assert rep["hw_flops_step"] == pytest.approx(256 * recomputed, rel=1e-12)
    assert rep["model_flops_step"] == pytest.approx(256 * per_token, rel=1e-12)


def test_bilevel_update_cost_and_resample_stream(prepared_dir):
    """cpu-small-dwm's weighting on the tiny model: 5 stages x 1 update; each update = a weighted forward+backward
    of G samples, the reference forward+backward and no-grad forward, 2 no-grad forwards per probed sample."""
    from dwm.plan import make_report
    from dwm.train.memory import forward_flops_per_token

    cfg = load_config("src/dwm/recipes/cpu-small-dwm.toml", [*SMALL_RUN, f"data.dir={prepared_dir}"])
    rep = make_report(cfg, gpus=1, gpu_memory_gib=80, mfu=0.4, peak_tflops=989)
    T, G = 32, 8
    n, R = cfg.weighting.advanced.batch_size, cfg.weighting.advanced.ref_batch_size  # 128 probed, 16 reference passages
    F = forward_flops_per_token(rep["shape"], T)
    assert rep["updates"] == 5 and rep["updates_per_stage"] == 1
    assert rep["update_flops"] == pytest.approx(F * T * (3 * G + 4 * R + 2 * n), rel=1e-12)
    assert rep["stream_tokens"] == 4 * 4 * 256  # candidates x the token budget
    m = rep["mem"]
    state = m.step.weights + m.step.optimizer  # the trainer frees the gradients between steps
    assert m.update_extra == 3 * 4 * rep["shape"].n_params
    assert m.update_peak == pytest.approx(state + m.update_extra + m.step.activations + m.heap)
    assert "per bi-level update" in __import__("dwm.plan", fromlist=["x"]).format_report(rep)


@pytest.mark.slow
def test_memory_breakdown_sums_and_matches_the_state():
    n = model_shape("cpu-mini", 8192, 64).n_params
    m = plan_memory("cpu-mini", 8192, 64, 4, accum=2, device_type="cuda", precision="fp32")
    s = m.step
    assert s.weights + s.grads + s.optimizer + s.activations == pytest.approx(s.total)
    assert s.weights == pytest.approx(4 * n, rel=0.01)  # fp32 weights
    assert s.optimizer == pytest.approx(2 * 4 * n, rel=0.01)  # AdamW: exp_avg, exp_avg_sq (+ step scalars)
    assert s.activations > 2 * 64 * 4 * 8192 * 4  # at least a micro-batch's fp32 logits and their gradient
    assert m.heap == 0 and m.peak == m.step_peak
    cpu = plan_memory("cpu-mini", 8192, 64, 4, accum=2, device_type="cpu", precision="fp32")
    assert cpu.heap == pytest.approx(0.65 * cpu.step.activations) and cpu.peak == cpu.step.total + cpu.heap
    more = plan_memory("cpu-mini", 8192, 64, 8, accum=2, device_type="cuda", precision="fp32")
    assert more.step.activations > 1.8 * s.activations  # activations scale with the micro-batch


@pytest.mark.slow
def test_fsdp_divides_the_state_and_ddp_keeps_it():
    shape = model_shape("cpu-mini", 8192, 64)
    kw = {"accum": 2, "device_type": "cuda", "precision": "fp32", "shape": shape, "update_param_copies": 3}
    one = plan_memory("cpu-mini", 8192, 64, 4, **kw)
    ddp = plan_memory("cpu-mini", 8192, 64, 4, gpus=4, parallel="ddp", **kw)
    fsdp = plan_memory("cpu-mini", 8192, 64, 4, gpus=4, parallel="fsdp", **kw)
    unit = 4 * (shape.layer_params + shape.outer_params)  # the root unit + one decoder layer gathered, fp32
    assert ddp.step.weights == one.step.weights and ddp.step.optimizer == one.step.optimizer
    assert ddp.step.grads == 2 * one.step.grads  # DDP's buckets
    assert fsdp.step.weights == pytest.approx(one.step.weights / 4 + unit)
    assert fsdp.step.grads == pytest.approx(one.step.grads / 4 + unit)
    assert fsdp.step.optimizer == pytest.approx(one.step.optimizer / 4)
    assert fsdp.step.activations == one.step.activations
    assert fsdp.update_extra == pytest.approx(one.update_extra / 4)
    act = one.step.activations
    assert one.update_peak == pytest.approx(one.step.weights + one.step.optimizer + one.update_extra + act)
    assert ddp.update_peak == pytest.approx(one.update_peak + one.step.grads)  # DDP's buckets stay allocated
    assert fsdp.update_peak == pytest.approx(fsdp.step.weights + fsdp.step.optimizer + fsdp.update_extra + act)


def test_train_refuses_before_step_0_with_one_line(prepared_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(prepared_dir), "--out", str(out), *SMALL_RUN, "log.progress=false",
               "train.memory_limit_gib=0.001"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "predicted peak memory per device" in err and "exceeds 0.001 GiB (train.memory_limit_gib)" in err
    assert "weights" in err and "activations" in err and "train.micro_batch_size" in err
    assert not out.exists()  # nothing written: refused before the trainer starts


def test_train_runs_under_a_generous_limit(prepared_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(prepared_dir), "--out", str(out), *SMALL_RUN, "log.progress=false",
               "train.memory_limit_gib=4"])
    assert rc == 0 and (out / "checkpoints" / "LATEST").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["plan", "paper-370m-dwn"], "did you mean paper-370m-dwm?"),
    (["plan", "paper-370m-dwm", "--gpus", "0"], "--gpus must be >= 1"),
    (["plan", "paper-370m-dwm", "--gpu-memory", "-1"], "--gpu-memory must be > 0"),
    (["plan", "paper-370m-dwm", "--mfu", "2"], "--mfu must be in (0, 1]"),
    (["plan", "paper-370m-dwm", "train.memory_limit_gib=-1"], "memory_limit_gib"),
    (["plan", "paper-370m-dwm", "train.micro_batch_sise=4"], "did you mean"),
    (["plan", "cpu-small-dwm", "data.dir=/nonexistent"], "give --seq-len and --vocab-size"),
    (["plan", "paper-370m-dwm", "--gpus", "3"], "not divisible"),
])
def test_bad_input_is_one_line(argv, needle, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


@pytest.mark.slow
def test_plan_cli_prints_the_fit(prepared_dir, capsys):
    rc = main(["plan", "cpu-small-dwm", f"data.dir={prepared_dir}", "model.spec=tiny",
               "train.global_batch_tokens=256", "train.micro_batch_size=4", "--gpu-memory", "0.001"])
    out = capsys.readouterr().out
    assert rc == 0 and "parameters" in out and "per bi-level update" in out
    assert "DOES NOT FIT" in out and "GPU-hours" in out and "data stream must hold" in out
    assert GIB == 1024 ** 3


@pytest.mark.slow
def test_layer_extrapolation_equals_the_full_trace():
    """Deeper models are traced at 1 and 2 layers and extrapolated: the same bytes as tracing all 4 of
    cpu-small, with and without activation checkpointing."""
    import torch

    from dwm.train.memory import _trace, llama_config_for, trace_step_memory

    cfg = llama_config_for("cpu-small", 512, 32)
    for ckpt in (False, True):
        full = _trace(cfg, 4, 2, 32, 2, torch.float32, False, ckpt)
        ext = trace_step_memory("cpu-small", 512, 32, 2, accum=2, activation_checkpointing=ckpt)
        assert {k: getattr(ext, k) for k in full} == pytest.approx(full)
