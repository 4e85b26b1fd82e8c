"""Parameter-space decompositions. Importing this package registers its CLI methods."""

from . import apd as apd
from . import apd_run as apd_run
from . import l3d as l3d
from . import l3d_metrics as l3d_metrics
from . import l3d_run as l3d_run
from . import spd as spd
from . import spd_metrics as spd_metrics
from . import spd_run as spd_run
from . import weights as weights
from .apd_run import APDConfig as APDConfig
from .apd_run import APDRun as APDRun
from .apd_run import apd_config as apd_config
from .apd_run import load_apd_run as load_apd_run
from .apd_run import train_apd as train_apd
from .l3d_run import L3DConfig as L3DConfig
from .l3d_run import l3d_config as l3d_config
from .l3d_run import train_l3d as train_l3d
from .spd_run import SPDConfig as SPDConfig
from .spd_run import SPDRun as SPDRun
from .spd_run import load_spd_run as load_spd_run
from .spd_run import spd_config as spd_config
from .spd_run import train_spd as train_spd
