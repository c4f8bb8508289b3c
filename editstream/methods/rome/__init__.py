"""ROME and MEMIT: rank-one / low-rank rewrites of MLP output matrices, with key statistics."""
