"""regnde: regularizers that make neural differential equations cheap to solve, on any solver.

Importing regnde is cheap: backends (torch, JAX) are imported on first use.
"""

from importlib.metadata import PackageNotFoundError, version

from regnde import distributed as distributed
from regnde import regularizers as regularizers
from regnde import samplers as samplers
from regnde import schedules as schedules
from regnde.api import backends as backends
from regnde.api import methods as methods
from regnde.api import solve as solve
from regnde.api import step as step
from regnde.backend import Backend as Backend
from regnde.backend import Key as Key
from regnde.backend import Point as Point
from regnde.backend import Run as Run
from regnde.dropin import regularize as regularize
from regnde.errors import MaxStepsExceeded as MaxStepsExceeded
from regnde.errors import NonFiniteError as NonFiniteError
from regnde.errors import PluginError as PluginError
from regnde.errors import SolverError as SolverError
from regnde.errors import StepSizeUnderflow as StepSizeUnderflow
from regnde.plugins.hookspecs import hookimpl as hookimpl
from regnde.steer import steer as steer
from regnde.tableau import Tableau as Tableau
from regnde.trace import Solution as Solution
from regnde.trace import Stats as Stats
from regnde.trace import StepResult as StepResult
from regnde.trace import Trace as Trace

try:
    __version__ = version("regnde")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"
