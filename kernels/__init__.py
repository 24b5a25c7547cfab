"""Triton kernels, each beside a plain PyTorch reference (``naive.py``) that defines it."""
