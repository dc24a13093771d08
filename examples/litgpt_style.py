"""DWM in a litgpt / torchtune shaped loop (docs/LIBRARY.md): the model returns a logits tensor (wrapped with
dwm.weighting.loop.LogitsModel for the bi-level updates), batches are (input_ids, labels) with -100 on ignored
positions, and the loss is cross-entropy per sample, weighted by DWM. Runs as it is with a tiny stand-in GPT."""
import torch
import torch.nn.functional as F

import dwm
from dwm.weighting.loop import LogitsModel


class TinyGPT(torch.nn.Module):  # stands in for litgpt.GPT / a torchtune TransformerDecoder: ids -> logits
    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.emb, self.mix = torch.nn.Embedding(vocab, dim), torch.nn.GRU(dim, dim, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.mix(self.emb(idx))[0])


def per_sample_ce(logits, labels):  # litgpt's chunked_cross_entropy, per sample: shift, ignore -100
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none")
    mask = (labels[:, 1:] != -100).float()
    return (nll.view_as(mask) * mask).sum(1) / mask.sum(1).clamp_min(1)


def main(batches, reference, steps=20, seed=0):
    torch.manual_seed(seed)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    weighter = dwm.DWM(LogitsModel(model), optimizer, reference, domains=2, vocab_size=64, micro_batch_size=16)
    for step in range(steps):
        input_ids, labels, dom = batches(step)
        weighter.maybe_update(step, steps, input_ids, domain_ids=dom)
        w = weighter.weights(input_ids, domain_ids=dom)
        loss = (w * per_sample_ce(model(input_ids), labels)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weighter, w, dom


if __name__ == "__main__":
    from plain_pytorch import toy_batch

    g = torch.Generator().manual_seed(0)

    def batches(step):
        ids, dom = toy_batch(g)
        return ids, ids, dom  # labels: the inputs (no ignored positions here)

    _, w, dom = main(batches, [((s + 3 * torch.arange(32)) % 32).tolist() for s in range(16)])
    print("mean weight per domain (counting, noise):", [round(float(w[dom == d].mean()), 3) for d in (0, 1)])
