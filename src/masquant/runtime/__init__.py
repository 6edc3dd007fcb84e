"""The quantized linear and the kernels that run it."""
