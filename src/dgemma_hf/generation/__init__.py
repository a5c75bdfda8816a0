"""Generation: argument checks now; the CUDA-graph denoising engine lands here next."""
