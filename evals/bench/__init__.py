"""Speed: the benchmark commands (LLaVA, ViT, video DiT, kernels, host overhead), their models, FLOPs, roofline and
memory, and the GPU suite that runs them all."""
