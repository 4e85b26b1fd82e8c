"""The shared graph layer: node layers (directions or components, with importance and
basis) and edge matrices between adjacent layers, as immutable pytrees; pruning,
restriction, merging, networkx/JSON export, plotting and community detection.

References:
    Bushnaq et al. (2024), "The Local Interaction Basis" (arXiv 2405.10928); Newman
    (2006), "Modularity and community structure in networks" (PNAS 103:8577).
"""

from . import community as community
from . import export as export
from . import graph as graph
from . import plot as plot
from .community import Communities as Communities
from .community import detect_communities as detect_communities
from .community import modularity as modularity
from .community import undirected as undirected
from .export import from_json as from_json
from .export import load_json as load_json
from .export import save_json as save_json
from .export import to_json as to_json
from .export import to_networkx as to_networkx
from .graph import Graph as Graph
from .graph import NodeLayer as NodeLayer
from .graph import merge as merge
from .graph import node_id as node_id
from .graph import parse_node_id as parse_node_id
from .graph import prune as prune
from .graph import restrict as restrict
from .graph import top_nodes as top_nodes
from .plot import plot_graph as plot_graph
