"""Demo: an unmodified naive-attention transformer, compiled with backend="flexattn".

The model below is written the way many research codebases write attention:
``softmax(q @ k.T / sqrt(d) + alibi).masked_fill(causal & window)`` with GQA by
``repeat_interleave``.  Nothing in it knows about attn_inductor.  The demo
compiles it, checks outputs and gradients against eager, and prints the
explain report.  Runs on CPU (the memory-lean CPU path) or CUDA (the Triton
kernel) — whichever is available.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, window: int):
        super().__init__()
        self.heads, self.kv_heads, self.window = heads, kv_heads, window
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])
        self.register_buffer("slopes", slopes)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)

        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        pos = torch.arange(T, device=x.device)
        alibi = self.slopes[:, None, None] * (pos[None, :] - pos[:, None])[None]
        scores = scores + alibi
        keep = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < self.window)
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        y = (probs @ v).transpose(1, 2).reshape(B, T, C)
        return self.o(y)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, window):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, window)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=256, dim=128, layers=2, heads=8, kv_heads=2, window=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, window) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def main(argv=None):
    import attn_inductor  # only for explain(); the backend itself is found by name

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = TinyLM().to(dev)
    tokens = torch.randint(0, 256, (args.batch, args.seq), device=dev)

    print(attn_inductor.explain(model, tokens))
    print()

    compiled = torch.compile(model, backend="flexattn")
    t0 = time.perf_counter()
    logits = compiled(tokens)
    t_compile = time.perf_counter() - t0
    eager = model(tokens)
    with torch.no_grad():
        ref = model.double()(tokens).float()
        model.float()
    err = (logits - ref).abs().max().item()
    eager_err = (eager - ref).abs().max().item()
    print(f"forward: max |compiled - fp64| = {err:.2e}   (eager fp32: {eager_err:.2e})   "
          f"first call incl. compile {t_compile:.1f}s")

    # one training step: gradients through the rewritten attention
    loss_c = F.cross_entropy(compiled(tokens).flatten(0, 1), tokens.flatten())
    loss_c.backward()
    g_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss_e.backward()
    g_e = [p.grad for p in model.parameters()]
    gerr = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-12) for a, b in zip(g_c, g_e))
    print(f"training step: loss {loss_c.item():.4f} vs eager {loss_e.item():.4f}; "
          f"max relative gradient difference {gerr:.2e}")
    ok = err <= 2 * eager_err + 1e-4 and gerr < 1e-3
    print("OK: compiled model matches eager" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
