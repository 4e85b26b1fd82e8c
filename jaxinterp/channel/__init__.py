"""The channel graph: a network as a compressed, modular computational graph. Blocks
(attention heads, MLPs, layers) are channels that read from and write to the residual
stream; each gets low-rank read and write subspaces from float64 JVP/VJP statistics,
blocks whose subspaces line up are joined by edges, the graph is pruned and clustered
into modules, and per-example usage of the channels gives circuits.

``jaxinterp run channel-graph TARGET`` runs it (see :mod:`.run`).

References:
    specs/channel-graph.md (project method); Elhage et al. (2021), "A Mathematical
    Framework for Transformer Circuits"; Bushnaq et al. (2024), "The Local Interaction
    Basis" (arXiv 2405.10928).
"""

from . import adapters as adapters
from . import assemble as assemble
from . import bridges as bridges
from . import compression as compression
from . import direction as direction
from . import edges as edges
from . import figures as figures
from . import induction as induction
from . import model as model
from . import modules as modules
from . import pipeline as pipeline
from . import randomized as randomized
from . import recovery as recovery
from . import refine as refine
from . import run as run
from . import stats as stats
from . import subspaces as subspaces
from . import usage as usage
from .adapters import channel_model_for as channel_model_for
from .assemble import ChannelGraph as ChannelGraph
from .assemble import as_graph as as_graph
from .assemble import block_components as block_components
from .compression import compression_curves as compression_curves
from .direction import direction_edges as direction_edges
from .edges import causal_edges as causal_edges
from .edges import geometric_edges as geometric_edges
from .model import ChannelModel as ChannelModel
from .model import trace as trace
from .pipeline import ChannelGraphConfig as ChannelGraphConfig
from .pipeline import channel_graph as channel_graph
from .refine import refine_channels as refine_channels
from .run import channel_graph_config as channel_graph_config
from .run import run_channel_graph as run_channel_graph
from .stats import channel_stats as channel_stats
from .subspaces import channels_from_stats as channels_from_stats
