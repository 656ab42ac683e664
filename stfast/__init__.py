"""stfast: fused causal, factorized spatio-temporal and block-sparse attention."""

from . import backends, distributed, layouts
from .functional import (attention, block_sparse_attention, scaled_dot_product_attention,
                         spatiotemporal_attention)
from .layouts import BlockLayout
from .modules import (BlockSparseSelfAttention, CausalSelfAttention, MultiheadAttention,
                      SpatioTemporalAttention, SpatioTemporalCrossAttention)

__version__ = "0.1.0"

# Load the backends now, not on the first call, so dispatch inside torch.compile
# does no importing; a backend that cannot load records why and stays unavailable.
for _name in backends.BACKEND_NAMES:
    backends.get(_name)
del _name

__all__ = [
    "attention", "block_sparse_attention", "scaled_dot_product_attention",
    "spatiotemporal_attention", "BlockLayout", "BlockSparseSelfAttention", "CausalSelfAttention",
    "MultiheadAttention", "SpatioTemporalAttention", "SpatioTemporalCrossAttention", "backends", "distributed", "layouts", "__version__",
]
