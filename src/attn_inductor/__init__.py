"""attn_inductor: a torch.compile backend that finds naive attention and runs it as a fused flash kernel.

    torch.compile(model, backend="flexattn")          # no import needed (entry point)
    attn_inductor.explain(model, *inputs)              # what was rewritten, and why not
    attn_inductor.testing.assert_rewritten(model, *inputs)
"""

from . import ops  # noqa: F401  registers torch.ops.attn_inductor.*
from .backend import flexattn_backend, make_backend
from .explain import ExplainReport, explain
from .options import BackendOptions

__version__ = "0.1.0"

__all__ = ["explain", "ExplainReport", "BackendOptions", "flexattn_backend", "make_backend", "__version__"]
