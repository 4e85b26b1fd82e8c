"""Training: optimizer factory, schedules and the generic fit loop."""

from .fit import FitResult as FitResult
from .fit import NonFiniteLossError as NonFiniteLossError
from .fit import TrainState as TrainState
from .fit import fit as fit
from .optim import make_optimizer as make_optimizer
from .schedules import SCHEDULES as SCHEDULES
from .schedules import depends_on_total as depends_on_total
from .schedules import make_schedule as make_schedule
