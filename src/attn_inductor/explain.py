"""``explain(model, *inputs)``: every attention site, rewritten or not and why.

Runs the model once under ``torch.compile`` with our backend in explain mode
(rewrite, but skip Inductor code generation) and returns an
:class:`ExplainReport`: ``str()`` is a table, ``to_json()`` is for tools and CI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .backend import collect_reports, make_backend
from .report import SiteReport


@dataclass
class ExplainReport:
    sites: list[SiteReport] = field(default_factory=list)
    #: Dynamo's graph-break reasons during the run: code on the far side of a break runs eagerly and is
    #: never seen by the backend, so an attention there is neither rewritten nor listed as a site
    graph_breaks: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def not_rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    @property
    def all_rewritten(self) -> bool:
        return bool(self.sites) and not self.not_rewritten

    def to_dict(self) -> dict:
        return {
            "num_sites": len(self.sites),
            "num_rewritten": len(self.rewritten),
            "sites": [s.to_dict() for s in self.sites],
            "graph_breaks": list(self.graph_breaks),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        lines = [f"attn_inductor: {len(self.sites)} attention site(s), {len(self.rewritten)} rewritten, "
                 f"{len(self.not_rewritten)} not rewritten"]
        if not self.sites:
            lines.append("  (no softmax found in the compiled graphs)")
            lines.extend(self._graph_break_lines())
            return "\n".join(lines)
        header = f"  {'#':>3}  {'graph':>5}  {'node':<16} {'status':<14} {'impl':<18} {'Q [B,H,L,D]':<20} " \
                 f"{'K [B,H,L,D]':<20} {'GQA':>3}  {'tiles visited':<14}"
        lines.append(header)
        for i, s in enumerate(self.sites):
            status = "rewritten" if s.rewritten else "NOT rewritten"
            q = _shape(s.q_shape)
            k = _shape(s.k_shape)
            sp = f"{100 * s.sparsity:.1f}%" if s.sparsity is not None else ("run time" if s.rewritten else "")
            lines.append(f"  {i:>3}  {s.graph:>5}  {str(s.node):<16} {status:<14} {str(s.implementation or ''):<18} "
                         f"{q:<20} {k:<20} {str(s.gqa_group or ''):>3}  {sp:<14}")
            if s.rewritten:
                lines.append(f"         score: {s.score}")
                lines.append(f"         mask:  {s.mask}")
                if s.captured:
                    lines.append(f"         captured: {', '.join(s.captured)}")
                if s.blocks:
                    lines.append(f"         blocks: {s.blocks[0]}x{s.blocks[1]}"
                                 + (f"  ({s.sparsity_note})" if s.sparsity_note else ""))
                elif s.sparsity_note:
                    lines.append(f"         note: {s.sparsity_note}")
                if s.walk:
                    lines.append(f"         walk:  {s.walk}")
                if s.lengths:
                    lines.append(f"         lengths: {s.lengths}")
                if s.block_map:
                    for row in s.block_map.splitlines():
                        lines.append(f"         {row}")
            else:
                lines.append(f"         reason: {s.reason}")
        lines.extend(self._graph_break_lines())
        return "\n".join(lines)

    def _graph_break_lines(self, shown: int = 3) -> list[str]:
        if not self.graph_breaks:
            return []
        lines = [f"  Dynamo graph breaks: {len(self.graph_breaks)} (code past a break runs eagerly: an attention "
                 "there is not seen; TORCH_LOGS=graph_breaks shows where)"]
        for reason in self.graph_breaks[:shown]:
            first = reason.strip().splitlines()[0] if reason.strip() else reason
            lines.append(f"    - {first[:160]}")
        if len(self.graph_breaks) > shown:
            lines.append(f"    ... and {len(self.graph_breaks) - shown} more")
        return lines


def _shape(shape) -> str:
    return "[" + ",".join(str(x) for x in shape) + "]" if shape else "-"


def explain(model, *inputs, options: dict | None = None, **kwargs) -> ExplainReport:
    """Compile ``model`` with the flexattn backend (explain mode), run it once on ``inputs``, report every site."""
    torch._dynamo.reset()
    breaks = _graph_break_counter()
    before = dict(breaks)
    with collect_reports() as reports:
        compiled = torch.compile(model, backend=make_backend(options, explain_only=True))
        compiled(*inputs, **kwargs)
    torch._dynamo.reset()
    new_breaks = [reason for reason, n in breaks.items() if n > before.get(reason, 0)]
    return ExplainReport(list(reports), graph_breaks=new_breaks)


def _graph_break_counter():
    """Dynamo's counter of graph-break reasons (the same object in torch 2.11 and 2.13)."""
    from torch._dynamo.utils import counters

    return counters["graph_break"]
