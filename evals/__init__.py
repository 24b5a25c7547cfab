"""Benchmarks, quality probes and the lmms-eval plugin. Nothing in vtoken depends on this package."""
