"""Local Interaction Basis (LIB): node layers and sections, float64 statistics, bases
(neuron, PCA, LIB and its integrated-gradient variants), interaction edges, ablations and
the ``jaxinterp run lib TARGET`` runner.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis: Identifying
    Computationally-Relevant and Sparsely Interacting Features in Neural Networks"
    (arXiv 2405.10928); Bushnaq et al. (2024), "Using Degeneracy in the Loss Landscape
    for Mechanistic Interpretability" (arXiv 2405.10927).
"""

from . import ablation as ablation
from . import adapters as adapters
from . import basis as basis
from . import dense as dense
from . import edges as edges
from . import figures as figures
from . import fourier as fourier
from . import grams as grams
from . import quadrature as quadrature
from . import run as run
from . import sections as sections
from . import stats as stats
from .adapters import mlp_sections as mlp_sections
from .adapters import modadd_sections as modadd_sections
from .adapters import sections_for as sections_for
from .basis import InteractionBasis as InteractionBasis
from .basis import LayerBasis as LayerBasis
from .basis import interaction_basis as interaction_basis
from .edges import assemble_graph as assemble_graph
from .edges import interaction_edges as interaction_edges
from .run import LIBConfig as LIBConfig
from .run import lib_config as lib_config
from .run import run_lib as run_lib
from .sections import Sectioned as Sectioned
from .sections import collect_activations as collect_activations
