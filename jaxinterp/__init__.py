"""jaxinterp: a JAX toolkit for mechanistic interpretability."""

__version__ = "0.1.0"

from . import channel as channel
from . import decomposition as decomposition
from . import graph as graph
from . import interventions as interventions
from . import io as io
from . import jacobians as jacobians
from . import lib as lib
from . import models as models
from . import rng as rng
from . import sharding as sharding
from . import target as target
from . import train as train
from . import tree as tree
from .models import get_target as get_target
from .models import load_target as load_target
from .models import train_target as train_target
