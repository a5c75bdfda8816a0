"""Triton kernels of dgemma_hf (installed as `dgemma_hf.kernels`).

Kernels know tensors, never models: each module here depends on torch and triton only, and each host wrapper
checks shapes, dtypes and strides before launching.
"""
