"""The catalogue of naive-attention spellings the backend must recognise (and refuse).

Each case is plain user-style PyTorch, written the way models write it.  The
tests (tests/test_spellings.py) compile each one with ``backend="flexattn"``
and check the rewrite, the recovered expressions and the numerics; the
supported-patterns page in docs/ is generated from this list
(``python -m tests.spellings > docs/supported-patterns.md`` regenerates it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

B, H, L, D = 2, 4, 16, 8


@dataclass
class Case:
    name: str
    group: str
    make: Callable[[torch.dtype], tuple[nn.Module, tuple]]
    score: str | None = None          # expected recovered score (None: not checked)
    mask: str | None = None           # expected recovered mask
    refuse: str | None = None         # expected refusal reason substring (negative case)
    grads: bool = True
    dtypes: tuple = (torch.float32,)
    note: str = ""
    gqa: int = 1                      # expected GQA group recovered from repeat_interleave / expand
    tags: tuple = field(default_factory=tuple)


def qkv(dtype, b=B, h=H, lq=L, lk=L, d=D, hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


class Fn(nn.Module):
    """Wrap a function as a module (so parameters/buffers can be attached)."""

    def __init__(self, fn, **tensors):
        super().__init__()
        self.fn = fn
        for name, t in tensors.items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            elif isinstance(t, nn.Module):
                self.add_module(name, t)
            else:
                self.register_buffer(name, t)

    def forward(self, *args):
        return self.fn(self, *args)


def simple(fn, **tensors):
    def make(dtype):
        mod = Fn(fn, **{k: (v() if callable(v) else v) for k, v in tensors.items()})
        return mod, qkv(dtype)
    return make


def causal_bool(n, m=None):
    m = n if m is None else m
    return torch.ones(n, m, dtype=torch.bool).tril()


CASES: list[Case] = []


def case(*args, **kwargs):
    CASES.append(Case(*args, **kwargs))


# ----------------------------------------------------------------------------- matmul spellings
case("matmul / sqrt(d)", "matmul",
     simple(lambda s, q, k, v: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v),
     score="score", mask="none")
case("matmul * d**-0.5, .mT", "matmul",
     simple(lambda s, q, k, v: F.softmax(torch.matmul(q, k.mT) * q.shape[-1] ** -0.5, dim=-1).matmul(v)),
     score="score", mask="none")
case("bmm on flattened heads", "matmul",
     simple(lambda s, q, k, v: torch.bmm(
         torch.softmax(torch.bmm(q.reshape(-1, L, D), k.reshape(-1, L, D).transpose(1, 2)) / math.sqrt(D), -1),
         v.reshape(-1, L, D)).view(B, H, L, D)),
     score="score", mask="none")
case("einsum", "matmul",
     simple(lambda s, q, k, v: torch.einsum(
         "bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(D ** -0.5).softmax(-1), v)),
     score="score", mask="none")
case("K pre-transposed", "matmul",
     simple(lambda s, q, k, v: torch.softmax(q @ k.transpose(-1, -2).contiguous() * 0.3, -1) @ v),
     score="score", mask="none")
case("permute to [B,H,L,D] from [B,L,H,D]", "matmul",
     simple(lambda s, q, k, v: (torch.softmax(
         q.transpose(1, 2).permute(0, 2, 1, 3) @ k.transpose(1, 2).permute(0, 2, 3, 1) * 0.25, -1)
         @ v.transpose(1, 2).permute(0, 2, 1, 3))),
     score="score", mask="none")
case("scale on q", "scale",
     simple(lambda s, q, k, v: torch.softmax((q * D ** -0.5) @ k.mT, -1) @ v), score="score", mask="none")
case("scale on q and k", "scale",
     simple(lambda s, q, k, v: torch.softmax((q * D ** -0.25) @ (k * D ** -0.25).transpose(-2, -1), -1) @ v),
     score="score", mask="none")
case("no scale", "scale",
     simple(lambda s, q, k, v: torch.softmax(q @ k.mT, -1) @ v), score="score", mask="none")
case("softmax(dtype=float32) then cast back", "dtype",
     simple(lambda s, q, k, v: F.softmax(q @ k.mT / math.sqrt(D), dim=-1, dtype=torch.float32).to(q.dtype) @ v),
     score="score", mask="none", dtypes=(torch.float32, torch.bfloat16))
case("softmax of .float(), type_as", "dtype",
     simple(lambda s, q, k, v: torch.softmax((q @ k.mT).float() / math.sqrt(D), -1).type_as(q) @ v),
     score="score", mask="none", dtypes=(torch.float32, torch.bfloat16))

# ----------------------------------------------------------------------------- masks
case("masked_fill(tril == 0, -inf)", "mask",
     simple(lambda s, q, k, v: torch.softmax(
         (q @ k.mT / math.sqrt(D)).masked_fill(torch.tril(torch.ones(L, L)) == 0, float("-inf")), -1) @ v),
     score="score", mask="kv_idx - q_idx <= 0")
case("masked_fill(triu(diagonal=1), finfo.min)", "mask",
     simple(lambda s, q, k, v: torch.softmax(
         (q @ k.mT).masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1),
                                torch.finfo(q.dtype).min), -1) @ v),
     score="score", mask="kv_idx - q_idx < 1")
case("where(arange causal, s, -inf)", "mask",
     simple(lambda s, q, k, v: torch.softmax(torch.where(
         torch.arange(L)[:, None] >= torch.arange(L)[None, :], q @ k.mT * 0.3, float("-inf")), -1) @ v),
     score="score", mask="q_idx >= kv_idx")
case("additive 0/-inf float mask", "mask",
     simple(lambda s, q, k, v: torch.softmax(
         q @ k.mT + torch.zeros(L, L).masked_fill(~causal_bool(L), float("-inf")), -1) @ v),
     score="score", mask="kv_idx - q_idx <= 0")
case("additive 0/finfo.min float mask", "mask",
     simple(lambda s, q, k, v: torch.softmax(
         q @ k.mT + torch.full((L, L), torch.finfo(torch.float32).min).triu(1), -1) @ v),
     score="score", mask="kv_idx - q_idx < 1")
case("ones(...).tril() bool mask", "mask",
     simple(lambda s, q, k, v: torch.softmax(
         (q @ k.mT).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")), -1) @ v),
     score="score", mask="kv_idx - q_idx <= 0")


def _gpt2_buffer(self, q, k, v):
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
    return F.softmax(att, dim=-1) @ v


case("GPT-2 registered causal buffer, sliced", "mask",
     simple(_gpt2_buffer, bias=lambda: torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)),
     score="score", mask="self.bias[0, 0, q_idx, kv_idx] != 0")


def _padding_case(style):
    def make(dtype):
        q, k, v = qkv(dtype)
        pad = torch.ones(B, L, dtype=torch.bool)
        pad[0, :5] = False     # left padding
        pad[1, -3:] = False    # right padding

        def fn(s, q, k, v, pad):
            sc = q @ k.mT / math.sqrt(D)
            if style == "-inf":
                sc = sc.masked_fill(~pad[:, None, None, :], float("-inf"))
            elif style == "finfo":
                sc = sc.masked_fill(pad[:, None, None, :].logical_not(), torch.finfo(sc.dtype).min)
            elif style == "causal&pad":
                keep = pad[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
                sc = sc.masked_fill(~keep, torch.finfo(sc.dtype).min)   # left padding → fully masked rows
            return torch.softmax(sc, -1) @ v
        return Fn(fn), (q, k, v, pad)
    return make


case("padding mask [B,S] → [B,1,1,S], -inf", "mask", _padding_case("-inf"),
     score="score", mask="args[3][b, kv_idx]")
case("padding mask, finfo.min", "mask", _padding_case("finfo"), score="score", mask="args[3][b, kv_idx]")
case("causal & padding, finfo.min (fully masked rows)", "mask", _padding_case("causal&pad"), score="score",
     mask="args[3][b, kv_idx] & kv_idx - q_idx <= 0",
     note="left-padded query rows see no key: eager gives the mean of V, and so do we")


def _window(self, q, k, v):
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    keep = (i >= j) & (i - j < 5)
    return torch.softmax((q @ k.mT).masked_fill(~keep, float("-inf")), -1) @ v


case("sliding window & causal", "mask", simple(_window), score="score", mask="q_idx >= kv_idx & q_idx - kv_idx < 5")


def _document(self, q, k, v):
    keep = (self.doc[:, None] == self.doc[None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    return torch.softmax((q @ k.mT * 0.35).masked_fill(~keep, float("-inf")), -1) @ v


case("document ids from a tensor", "mask",
     simple(_document, doc=lambda: torch.tensor([0] * 5 + [1] * 7 + [2] * 4)), score="score",
     mask="self.doc[q_idx] == self.doc[kv_idx] & kv_idx - q_idx <= 0")


def _prefix(self, q, k, v):
    i = torch.arange(L).view(-1, 1)
    j = torch.arange(L).view(1, -1)
    keep = (j < 6) | (j <= i)
    return torch.softmax(torch.where(keep, q @ k.mT / 3.0, -torch.inf), -1) @ v


case("prefix-LM", "mask", simple(_prefix), score="score", mask="kv_idx < 6 | kv_idx <= q_idx")


# ----------------------------------------------------------------------------- biases
def _alibi(self, q, k, v):
    pos = torch.arange(L)
    rel = pos[None, :] - pos[:, None]                      # kv - q
    bias = self.slopes[:, None, None] * rel[None]          # [H, L, L]
    sc = q @ k.mT / math.sqrt(D) + bias
    sc = sc.masked_fill(~causal_bool(L), float("-inf"))
    return torch.softmax(sc, -1) @ v


case("ALiBi from arange and per-head slopes", "bias",
     simple(_alibi, slopes=lambda: torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])),
     score="score + self.slopes[h] * (kv_idx - q_idx)", mask="kv_idx - q_idx <= 0")


def _relpos(self, q, k, v):
    pos = torch.arange(L)
    rel = pos[:, None] - pos[None, :] + L - 1               # [L, L] in [0, 2L-2]
    bias = self.table[:, rel]                               # [H, L, L]
    return torch.softmax(q @ k.mT * D ** -0.5 + bias, -1) @ v


case("learned relative-position table [H, 2L-1]", "bias",
     simple(_relpos, table=lambda: nn.Parameter(0.5 * torch.randn(H, 2 * L - 1))),
     score="score + self.table[h, q_idx - kv_idx + 15]", mask="none")


def t5_bucket(relative_position, bidirectional=True, num_buckets=8, max_distance=20):
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    rel_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)).to(torch.long)
    rel_if_large = torch.min(rel_if_large, torch.full_like(rel_if_large, num_buckets - 1))
    relative_buckets += torch.where(is_small, relative_position, rel_if_large)
    return relative_buckets


def _t5(self, q, k, v):
    ctx = torch.arange(L)[:, None]
    mem = torch.arange(L)[None, :]
    buckets = t5_bucket(mem - ctx)
    bias = self.rel(buckets).permute(2, 0, 1).unsqueeze(0)   # [1, H, L, L]
    return torch.softmax(q @ k.mT + bias, -1) @ v            # T5: no scaling


case("T5 bucketed relative bias (nn.Embedding)", "bias", simple(_t5, rel=lambda: nn.Embedding(8, H)),
     score="score + self.rel.weight[(kv_idx - q_idx > 0) * 4 + where(abs(kv_idx - q_idx) < 2, abs(kv_idx - q_idx), "
           "min(int(log(abs(kv_idx - q_idx) / 2) / 2.30259 * 2) + 2, 3)), h]", mask="none")


def _bias_tensor(self, q, k, v, bias):
    return torch.softmax(q @ k.mT / math.sqrt(D) + bias, -1) @ v


def _bias_make(dtype):
    q, k, v = qkv(dtype)
    return Fn(_bias_tensor), (q, k, v, torch.randn(1, H, L, L).to(dtype))


case("bias tensor [1, H, S, S] input", "bias", _bias_make, score="score + args[3][0, h, q_idx, kv_idx]",
     mask="none")


def _softcap(self, q, k, v):
    sc = q @ k.mT * D ** -0.5
    sc = torch.tanh(sc / 5.0) * 5.0
    sc = sc.masked_fill(~causal_bool(L), float("-inf"))
    return torch.softmax(sc, -1) @ v


case("tanh soft-capping before the mask", "score", simple(_softcap), score="tanh(score / 5) * 5",
     mask="kv_idx - q_idx <= 0")


# ----------------------------------------------------------------------------- layouts
def _gqa_make(spelling):
    def make(dtype):
        q, k, v = qkv(dtype, hkv=2)

        def fn(s, q, k, v):
            if spelling == "repeat_interleave":
                k = k.repeat_interleave(2, dim=1)
                v = torch.repeat_interleave(v, 2, dim=1)
            else:  # Hugging Face repeat_kv
                b, hk, n, d = k.shape
                k = k[:, :, None, :, :].expand(b, hk, 2, n, d).reshape(b, hk * 2, n, d)
                v = v[:, :, None, :, :].expand(b, hk, 2, n, d).reshape(b, hk * 2, n, d)
            return torch.softmax(q @ k.transpose(2, 3) / math.sqrt(D), -1) @ v
        return Fn(fn), (q, k, v)
    return make


case("GQA via repeat_interleave", "layout", _gqa_make("repeat_interleave"), score="score", mask="none",
     gqa=2)
case("GQA via expand + reshape (repeat_kv)", "layout", _gqa_make("repeat_kv"), score="score", mask="none", gqa=2)


def _cross_make(dtype):
    q, k, v = qkv(dtype, lq=12, lk=20)
    return Fn(lambda s, q, k, v: torch.softmax(q @ k.mT / math.sqrt(D), -1) @ v), (q, k, v)


case("cross-attention Lq != Lk", "layout", _cross_make, score="score", mask="none")


def _dropout_make(training: bool):
    def make(dtype):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.drop = nn.Dropout(0.1)

            def forward(self, q, k, v):
                return self.drop(torch.softmax(q @ k.mT / math.sqrt(D), -1)) @ v
        return M().train(training), qkv(dtype)
    return make


case("nn.Dropout in eval mode", "layout", _dropout_make(training=False), score="score", mask="none")


# ----------------------------------------------------------------------------- refusals
case("softmax over the query dim", "refused",
     simple(lambda s, q, k, v: torch.softmax(q @ k.mT, dim=-2) @ v),
     refuse="softmax over dim -2, not the key dimension")


def _returns_probs(self, q, k, v):
    p = torch.softmax(q @ k.mT / math.sqrt(D), -1)
    return p @ v, p


case("probabilities returned (output_attentions)", "refused", simple(_returns_probs),
     refuse="attention probabilities are used by more than one consumer")


case("dropout p > 0 in training", "refused", _dropout_make(training=True),
     refuse="dropout with p > 0 in training")


def _row_max(self, q, k, v):
    sc = q @ k.mT
    sc = sc - sc.amax(-1, keepdim=True)   # depends on the whole row: not an elementwise mod
    return torch.softmax(sc, -1) @ v


case("score mod that reads other scores (row max)", "refused", simple(_row_max),
     refuse="unsupported op")


def render_markdown() -> str:
    lines = ["# Supported patterns", "",
             "Generated from `tests/spellings.py` — every row is a test in `tests/test_spellings.py` "
             "(rewritten cases: explain + numerics + gradients vs an fp64 oracle; refused cases: the exact reason).",
             "Regenerate with `python -m tests.spellings > docs/supported-patterns.md`.", ""]
    groups: dict[str, list[Case]] = {}
    for c in CASES:
        groups.setdefault(c.group, []).append(c)
    titles = {"matmul": "Matmul spellings", "scale": "Scale", "dtype": "Softmax precision", "mask": "Masks",
              "bias": "Additive biases", "score": "Score modifications", "layout": "Layouts, GQA, cross-attention",
              "refused": "Refused (left to stock Inductor, with this reason in explain)"}
    for g, cs in groups.items():
        lines += [f"## {titles.get(g, g)}", "", "| pattern | recovered score | recovered mask | dtypes |",
                  "|---|---|---|---|"] if g != "refused" else [f"## {titles[g]}", "", "| pattern | reason |", "|---|---|"]
        for c in cs:
            if g == "refused":
                lines.append(f"| {c.name} | {c.refuse} |")
            else:
                dts = ", ".join(str(d).replace("torch.", "") for d in c.dtypes)
                score, mask = (x.replace("|", "\\|") for x in (c.score, c.mask))  # pipes would end the cell
                lines.append(f"| {c.name} | `{score}` | `{mask}` | {dts} |")
        lines.append("")
    lines += _walk_section()
    return "\n".join(lines)


def _walk_section() -> list[str]:
    """Which recovered masks the Triton kernels walk by closed-form bounds (masks/bounds.py), which by tables."""
    from attn_inductor.lowering import expr as E
    from attn_inductor.masks.bounds import kv_interval

    i64, b = E.INT64, E.BOOL
    q, kv = E.q_idx, E.kv_idx
    c = lambda v: E.const(v, i64)  # noqa: E731
    causal = E.call("ge", q, kv, dtype=b)
    masks = [
        causal,
        E.call("le", E.call("sub", kv, q, dtype=i64), c(0), dtype=b),
        E.call("ge", E.call("add", q, c(37), dtype=i64), kv, dtype=b),
        E.call("and", causal, E.call("lt", E.call("sub", q, kv, dtype=i64), c(5), dtype=b), dtype=b),
        E.call("le", E.call("abs", E.call("sub", q, kv, dtype=i64), dtype=i64), c(3), dtype=b),
        E.call("or", E.call("lt", kv, c(6), dtype=b), causal, dtype=b),
        E.call("eq", E.call("floordiv", q, c(8), dtype=i64), E.call("floordiv", kv, c(8), dtype=i64), dtype=b),
        E.call("and", causal, E.call("eq", E.Load(0, (q,), i64), E.Load(0, (kv,), i64), dtype=b), dtype=b),
        E.call("and", causal, E.Load(0, (E.b, kv), b), dtype=b),
        E.call("ne", q, kv, dtype=b),
    ]
    lines = ["## Tile walk in the Triton kernels", "",
             "Masks over `q_idx`/`kv_idx` alone that `masks/bounds.py` proves equal to `lo(q) <= kv_idx < hi(q)` "
             "(non-decreasing bounds) run with no sparsity tables: each program computes its tiles from the bounds "
             "(Note [closed-form bounds]). The others use block-sparsity tables (interval analysis, or exact "
             "evaluation of the tensors they read).", "",
             "| mask | walk |", "|---|---|"]
    for m in masks:
        iv = kv_interval(m)
        walk = f"bounds `{iv.describe()}`" if iv is not None else "tables"
        cell = E.format_expr(m).replace("|", "\\|")  # a pipe would end the table cell
        lines.append(f"| `{cell}` | {walk} |")
    lines.append("")
    return lines


if __name__ == "__main__":
    print(render_markdown())
