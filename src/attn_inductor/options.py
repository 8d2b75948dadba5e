"""BackendOptions: what ``torch.compile(..., options={...})`` may say to us.

Frozen and validated once per compile; an unknown key is an error that names
the valid ones (a typo must not silently do nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .lowering.spec import FULLY_MASKED_ROW_POLICIES

IMPLEMENTATIONS = ("auto", "triton", "cpu")


@dataclass(frozen=True)
class BackendOptions:
    #: what a row whose every key is masked returns: "eager" (NaN for -inf masks, mean of V for
    #: finfo.min masks — what the unmodified model computes) or "zeros"
    fully_masked_rows: str = "eager"
    #: "auto" (Triton on CUDA, the CPU path on CPU, Triton under TRITON_INTERPRET=1), "triton" or "cpu"
    impl: str = "auto"
    #: bitwise-repeatable backward (captured-tensor gradients without atomics races)
    deterministic: bool = False
    #: rewrite attention sites; False compiles with stock Inductor only (A/B comparisons)
    rewrite: bool = True
    #: compile the rest of the graph with Inductor; False runs the rewritten aten graph eagerly
    #: (debugging, fast tests)
    inductor: bool = True
    #: Inductor config patches passed through to ``compile_fx``
    inductor_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.fully_masked_rows not in FULLY_MASKED_ROW_POLICIES:
            raise ValueError(f"fully_masked_rows must be one of {FULLY_MASKED_ROW_POLICIES}, "
                             f"got {self.fully_masked_rows!r}")
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        for name in ("deterministic", "rewrite", "inductor"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown attn_inductor option(s) {unknown}; valid options are {valid}")
        return cls(**options)

    def runtime_config(self) -> dict:
        return {"impl": self.impl, "deterministic": self.deterministic}
