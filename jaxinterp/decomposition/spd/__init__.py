"""Stochastic Parameter Decomposition (SPD) as a pure transform over any target whose
decomposed weights are used as ``a @ W`` / ``a @ W.T`` (or looked up as ``W[idx]``).

Every decomposed matrix ``W_l: (d_in, d_out)`` is ``V_l @ U_l``: C rank-1 subcomponents.
Every *site* (a use of a matrix) has a causal-importance (CI) function giving
``g in [0, 1]`` per subcomponent and input. Masks ``g + (1 - g) r`` with ``r ~ U(0, 1)``
multiply the inner activations; the masked model must reproduce the target with every
site masked (stochastic loss) and with one site masked at a time (layerwise loss), while
``sum |g+|^p`` pushes importances to zero.

The later (``main``) code's options are switches whose defaults keep the paper recipe:
a delta component ``W - V U`` with a uniform mask, the ``normal`` init with a faithfulness
warm-up, the frequency term and p-annealing of the importance loss, subset routing, PGD
(adversarial) masks, hidden-activation reconstruction, a KL output divergence and the
vector / shared CI MLPs (``specs/spd.md`` sections 2 and 9).

:mod:`.core` holds the parameterisation, the CI functions and the masked forward pass;
:mod:`.losses` the loss terms and :func:`spd_loss`. Runs, presets and evaluation are in
:mod:`jaxinterp.decomposition.spd_run`, metrics in :mod:`~.spd_metrics`.

Shapes: ``C`` subcomponents per matrix, ``H`` CI hidden width, ``batch`` examples,
``sites`` decomposed weight uses.

References:
    Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter Decomposition" (arXiv 2506.20790).
"""

from .core import CI_FNS as CI_FNS
from .core import INITS as INITS
from .core import LEAK as LEAK
from .core import CIFunction as CIFunction
from .core import CIParams as CIParams
from .core import SharedCIParams as SharedCIParams
from .core import SPDComponents as SPDComponents
from .core import SPDWeight as SPDWeight
from .core import VectorCIParams as VectorCIParams
from .core import causal_importances as causal_importances
from .core import first_masked_site as first_masked_site
from .core import gated_lower_leaky_hard_sigmoid as gated_lower_leaky_hard_sigmoid
from .core import init_ci as init_ci
from .core import init_spd as init_spd
from .core import inner_acts as inner_acts
from .core import lower_leaky_hard_sigmoid as lower_leaky_hard_sigmoid
from .core import resolve_C as resolve_C
from .core import scalar_mlps as scalar_mlps
from .core import spd_forward as spd_forward
from .core import spd_forward_sites as spd_forward_sites
from .core import upper_leaky_hard_sigmoid as upper_leaky_hard_sigmoid
from .losses import DELTA_KEYS as DELTA_KEYS
from .losses import DIVERGENCES as DIVERGENCES
from .losses import EPS as EPS
from .losses import LAYERWISE as LAYERWISE
from .losses import PGD as PGD
from .losses import PGD_INITS as PGD_INITS
from .losses import ROUTE_KEY as ROUTE_KEY
from .losses import STOCHASTIC as STOCHASTIC
from .losses import SUBSET as SUBSET
from .losses import PGDConfig as PGDConfig
from .losses import SPDLossConfig as SPDLossConfig
from .losses import affine_output_sites as affine_output_sites
from .losses import annealed_p as annealed_p
from .losses import check_loss_config as check_loss_config
from .losses import check_pgd_config as check_pgd_config
from .losses import delta_masks as delta_masks
from .losses import divergence as divergence
from .losses import faithfulness_loss as faithfulness_loss
from .losses import faithfulness_warmup as faithfulness_warmup
from .losses import importance_minimality as importance_minimality
from .losses import pgd_recon as pgd_recon
from .losses import spd_loss as spd_loss
from .losses import stochastic_masks as stochastic_masks
from .losses import subset_routes as subset_routes
