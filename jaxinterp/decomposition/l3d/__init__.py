"""Local Loss Landscape Decomposition (L3D): sparse, low-rank parameter directions
("subnetworks") whose BatchTopK combination reconstructs each sample's divergence
gradient.

References:
    Chrisman, Bushnaq, Sharkey 2025, "Identifying Sparsely Active Circuits Through Local
    Loss Landscape Decomposition" (arXiv 2504.00194).
"""

from . import core as core
from . import gradients as gradients
from . import tucker as tucker
from .core import LOSSES as LOSSES
from .core import Subnetworks as Subnetworks
from .core import batch_topk_mask as batch_topk_mask
from .core import coefficients as coefficients
from .core import decoder_norms as decoder_norms
from .core import directions as directions
from .core import init_subnetworks as init_subnetworks
from .core import l3d_loss as l3d_loss
from .core import normalize_decoder as normalize_decoder
from .core import reconstruct as reconstruct
from .core import resolve_ranks as resolve_ranks
from .core import topk_count as topk_count
from .gradients import DIVERGENCES as DIVERGENCES
from .gradients import Ghost as Ghost
from .gradients import decomposed_fn as decomposed_fn
from .gradients import ghost_gradients as ghost_gradients
from .gradients import gradient_sq_norms as gradient_sq_norms
from .gradients import reference_indices as reference_indices
from .gradients import sample_gradients as sample_gradients
from .tucker import Tucker as Tucker
