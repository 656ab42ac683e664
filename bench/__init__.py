"""Side-by-side benchmarks of stfast against SDPA, FlexAttention and the permute + SDPA pipeline (``python -m bench``)."""
