"""The toy-model zoo. Importing this package registers every target."""

from . import block_mlp as block_mlp  # noqa: F401  (registers block-mlp)
from . import digits as digits  # noqa: F401  (registers digits-mlp)
from . import induction as induction  # noqa: F401  (registers induction)
from . import modadd as modadd  # noqa: F401  (registers modadd)
from . import planted as planted  # noqa: F401  (registers planted-channels)
from . import resid_mlp as resid_mlp  # noqa: F401  (registers resid-mlp-*)
from . import tmcs as tmcs  # noqa: F401  (registers tmcs, high-rank)
from . import tms as tms  # noqa: F401  (registers tms-*)
from . import x_squared as x_squared  # noqa: F401  (registers x-squared)
from .base import TARGETS as TARGETS
from .base import ToyTarget as ToyTarget
from .base import TrainConfig as TrainConfig
from .base import TrainedTarget as TrainedTarget
from .base import get_target as get_target
from .base import load_target as load_target
from .base import register as register
from .base import train_target as train_target
