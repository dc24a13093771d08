"""dwm.DWM in other people's loops: a plain PyTorch loop (examples/plain_pytorch.py), a litgpt/torchtune shaped
loop (examples/litgpt_style.py) and the transformers Trainer (dwm.integrations.hf). On a toy corpus whose domain 0
is like the reference and domain 1 is noise, the bi-level updates must raise domain 0's mean weight above 1."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REFERENCE = [((s + 3 * torch.arange(32)) % 32).tolist() for s in range(16)]


def _example(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(EXAMPLES))


def _check_moved(weighter, w, dom):
    assert [r["ok"] for r in weighter.history] == [True] * 5  # one update at each of the 5 stage starts
    assert float(w.sum()) == pytest.approx(len(w), rel=1e-5)
    assert float(w[dom == 0].mean()) > 1.0 > float(w[dom == 1].mean())


def test_plain_pytorch_loop_raises_the_target_like_domain():
    weighter, w, dom = _example("plain_pytorch").main(steps=20)
    _check_moved(weighter, w, dom)


@pytest.mark.slow
def test_litgpt_shaped_loop_raises_the_target_like_domain():
    toy_batch = _example("plain_pytorch").toy_batch
    g = torch.Generator().manual_seed(0)

    def batches(step):
        ids, dom = toy_batch(g)
        labels = ids.clone()
        labels[:, -4:] = -100  # ignored positions, as litgpt/torchtune mark them
        return ids, labels, dom

    weighter, w, dom = _example("litgpt_style").main(batches, REFERENCE, steps=20)
    _check_moved(weighter, w, dom)


def test_weights_before_any_update_are_uniform_and_select_prefers_what_phi_prefers():
    from transformers import LlamaConfig, LlamaForCausalLM

    import dwm

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    d = dwm.DWM(model, opt, REFERENCE, domains=["a", "b"], temperature=0.5)
    ids, dom = torch.randint(0, 64, (8, 16)), torch.tensor([0, 1] * 4)
    torch.testing.assert_close(d.weights(ids, domain_ids=dom), torch.ones(8))  # phi's head starts at zero
    # a phi that scores domain a 10 higher than b: select keeps only a's samples, weights follow the softmax
    d.scorer.scores = lambda batch, lm_loss: 10.0 * (batch.domain_ids == 0).float()
    keep = d.select(ids, 4, domain_ids=dom)
    assert list(keep) == [0, 2, 4, 6]
    w = d.weights(ids, domain_ids=dom)
    assert float(w[0]) / float(w[1]) == pytest.approx(np.exp(10.0 / 0.5), rel=1e-3)


def test_unknown_option_is_one_line_with_did_you_mean():
    import dwm
    from dwm.errors import UserError

    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="temperature"):
        dwm.DWM(model, torch.optim.SGD(model.parameters(), lr=0.1), REFERENCE, vocab_size=64, temprature=0.5)


@pytest.mark.slow
def test_state_dict_round_trip_continues_identically():
    mod = _example("plain_pytorch")
    a, _, _ = mod.main(steps=10)
    state = a.state_dict()
    b, _, _ = mod.main(steps=10, seed=1)  # another phi, another history
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()))
    assert b.learner.n_updates == a.learner.n_updates and len(b.learner.buffer) == len(a.learner.buffer)
    ids = torch.randint(0, 64, (6, 32))
    torch.testing.assert_close(a.weights(ids, domain_ids=torch.zeros(6)), b.weights(ids, domain_ids=torch.zeros(6)))


def test_hf_trainer_raises_the_target_like_domain(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    import dwm
    from dwm.integrations.hf import DWMTrainer

    toy_batch = _example("plain_pytorch").toy_batch
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(20):
        ids, dom = toy_batch(g)
        rows += [{"input_ids": i, "attention_mask": torch.ones_like(i), "domain_ids": d} for i, d in zip(ids, dom)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    weighter = dwm.DWM(model, opt, REFERENCE, domains=["counting", "noise"], micro_batch_size=16)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=16,
                             learning_rate=3e-3, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             remove_unused_columns=False, save_strategy="steps", save_steps=20, logging_steps=10,
                             seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = DWMTrainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None), dwm=weighter)
    trainer.train()
    assert [r["ok"] for r in weighter.history] == [True] * 5
    last = trainer.dwm_callback.last
    assert last["dwm_weight/counting"] > 1.0 > last["dwm_weight/noise"]
    assert (tmp_path / "weighting" / "stage_4.safetensors").is_file()
    saved = torch.load(tmp_path / "checkpoint-20" / "dwm_state.pt", weights_only=False)  # with the HF checkpoint
    assert saved["n_updates"] == 5 and saved["stage"] == 4


def test_readme_loop_is_the_tested_example():
    """The README's loop is examples/plain_pytorch.py's, line for line (that file is what the tests run)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("## Using DWM in your own code", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = [line.strip() for line in (root / "examples" / "plain_pytorch.py").read_text().splitlines()]
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert len(lines) >= 8
    start = example.index(lines[0])
    assert example[start:start + len(lines)] == lines
