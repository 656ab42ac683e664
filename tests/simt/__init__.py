"""A SIMT emulator that runs the CUDA kernels of csrc/ on the CPU (tests only, not shipped)."""
