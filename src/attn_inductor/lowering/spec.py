"""AttentionSpec: the semantics of one matched attention site.

The spec says *what* to compute, never *how*: the CPU path, the Triton
kernels and the fp64 oracle all read the same object.  It is frozen, hashable
and JSON-serialisable; the JSON string is what the custom op carries, so a
compiled graph needs no process-global registry to run.

Shapes seen by every implementation::

    q   [B, Hq,  Lq, D]        any strides
    k   [B, Hkv, Lk, D]        Hq = Hkv * gqa_group
    v   [B, Hkv, Lk, Dv]
    out [B, Hq,  Lq, Dv]       dtype of v
    lse [B, Hq,  Lq]           fp32, natural log

Semantics (see Note [fully masked rows] in docs/numerics.md)::

    s      = scale * (q · k)                       fp32
    hard   = mask(b, h, q_idx, kv_idx)             False -> the entry is -inf
    soft   = soft_mask(b, h, q_idx, kv_idx)        False -> entry is a huge finite negative
    live   = hard & soft
    row has a live entry:    softmax over live entries of score_live(s, ...)
    row has none but hard:   softmax over hard entries of score_full(s, ...)
                             (what eager computes when every entry got finfo.min)
    row has no hard entry:   NaN (eager), or zeros with fully_masked_rows="zeros"

``score_full`` is the exact eager modified score (soft-mask terms included);
``score_live`` equals it wherever ``soft`` holds and is cheaper to evaluate.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field

from . import expr as E
from .expr import Expr

FULLY_MASKED_ROW_POLICIES = ("eager", "zeros")


@dataclass(frozen=True)
class AttentionSpec:
    score_live: Expr
    mask: Expr | None = None
    soft_mask: Expr | None = None
    score_full: Expr | None = None  # None: same as score_live
    scale: float = 1.0
    gqa_group: int = 1
    num_captured: int = 0
    fully_masked_rows: str = "eager"
    dropout_p: float = 0.0
    # informational, not semantics: which captured tensors are index-only constants etc.
    extra: tuple = field(default=(), compare=True)

    def __post_init__(self):
        for name in ("score_live", "mask", "soft_mask", "score_full"):  # identical objects across specs
            object.__setattr__(self, name, E.canonical(getattr(self, name)))
        if self.fully_masked_rows not in FULLY_MASKED_ROW_POLICIES:
            raise ValueError(f"fully_masked_rows must be one of {FULLY_MASKED_ROW_POLICIES}")
        for pred in (self.mask, self.soft_mask):
            if pred is not None and pred.dtype != E.BOOL:
                raise TypeError(f"mask predicates must be bool, got {pred.dtype}")
            if pred is not None and E.uses_score(pred):
                raise ValueError("mask predicates may not depend on the score")

    # -- derived views ---------------------------------------------------------
    @property
    def full_score(self) -> Expr:
        return self.score_full if self.score_full is not None else self.score_live

    @functools.cached_property
    def live_mask(self) -> Expr | None:
        """The predicate block sparsity is computed from (hard & soft).

        Built once per spec: the kernels' launch plans and the sparsity cache key expressions by
        identity, so a fresh conjunction per call would miss them every time (and evict the rest)."""
        return E.canonical(E.and_(self.mask, self.soft_mask))

    @property
    def has_soft_mask(self) -> bool:
        return self.soft_mask is not None

    # -- serialisation ---------------------------------------------------------
    def to_json(self) -> str:
        def j(e):
            return None if e is None else E.to_json(e)

        return json.dumps(
            {
                "score_live": j(self.score_live),
                "mask": j(self.mask),
                "soft_mask": j(self.soft_mask),
                "score_full": j(self.score_full),
                "scale": self.scale,
                "gqa_group": self.gqa_group,
                "num_captured": self.num_captured,
                "fully_masked_rows": self.fully_masked_rows,
                "dropout_p": self.dropout_p,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str) -> "AttentionSpec":
        return _spec_from_json(text)

    @property
    def key(self) -> str:
        """Short stable hash, used to name generated kernels and caches."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def describe(self, names=None) -> dict:
        """Readable score/mask strings for explain()."""
        f = lambda e: None if e is None else E.format_expr(e, names)  # noqa: E731
        mask = E.and_(self.mask, self.soft_mask)
        return {"score": f(self.score_live), "mask": f(mask) if mask is not None else "none"}


@functools.lru_cache(maxsize=512)
def _spec_from_json(text: str) -> AttentionSpec:
    d = json.loads(text)

    def j(x):
        return None if x is None else E.from_json(x)

    return AttentionSpec(
        score_live=j(d["score_live"]),
        mask=j(d["mask"]),
        soft_mask=j(d["soft_mask"]),
        score_full=j(d["score_full"]),
        scale=float(d["scale"]),
        gqa_group=int(d["gqa_group"]),
        num_captured=int(d["num_captured"]),
        fully_masked_rows=d["fully_masked_rows"],
        dropout_p=float(d["dropout_p"]),
    )
