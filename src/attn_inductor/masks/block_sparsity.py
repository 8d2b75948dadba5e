"""Block sparsity tables (interface; implementation in progress)."""
