"""jaxinterp: a JAX toolkit for mechanistic interpretability."""

__version__ = "0.1.0"

from . import io as io
from . import models as models
from . import rng as rng
from . import train as train
from . import tree as tree
