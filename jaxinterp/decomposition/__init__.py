"""Parameter-space decompositions. Importing this package registers its CLI methods."""

from . import apd as apd
from . import apd_run as apd_run
from . import weights as weights
from .apd_run import APDConfig as APDConfig
from .apd_run import apd_config as apd_config
from .apd_run import train_apd as train_apd
