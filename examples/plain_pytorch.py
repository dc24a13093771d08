"""DWM in a plain PyTorch loop (docs/LIBRARY.md): a tiny LLaMA on a toy corpus of two domains, one like the target."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dwm
from dwm.nn.losses import per_sample_nll


def toy_batch(g, B=16, T=32):  # domain 0 counts up by 3 mod 32 (as the target does), domain 1 is noise
    dom = torch.arange(B) % 2
    count = (torch.randint(0, 32, (B, 1), generator=g) + 3 * torch.arange(T)) % 32
    return torch.where(dom[:, None] == 0, count, torch.randint(32, 64, (B, T), generator=g)), dom


def main(steps=20, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reference = [((s + 3 * torch.arange(32)) % 32).tolist() for s in range(16)]  # the target: token ids
    weighter = dwm.DWM(model, opt, reference, domains=["counting", "noise"], micro_batch_size=16)
    for step in range(steps):
        ids, dom = toy_batch(g)
        weighter.maybe_update(step, steps, ids, domain_ids=dom)  # phi's bi-level updates on the stage schedule
        w = weighter.weights(ids, domain_ids=dom)  # [B], mean 1
        loss = (w * per_sample_nll(model(input_ids=ids).logits, ids, torch.full((len(ids),), ids.shape[1]))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weighter, w, dom


if __name__ == "__main__":
    _, w, dom = main()
    print("mean weight per domain (counting, noise):", [round(float(w[dom == d].mean()), 3) for d in (0, 1)])
