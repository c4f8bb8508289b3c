"""Benchmarks whose JSON output, with its provenance, is committed under bench/results/."""
