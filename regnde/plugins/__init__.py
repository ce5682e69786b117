"""regnde's plugin machinery (pluggy, project name ``regnde``)."""

from regnde.plugins.hookspecs import HOOKS as HOOKS
from regnde.plugins.hookspecs import hookimpl as hookimpl
from regnde.plugins.hookspecs import hookspec as hookspec
from regnde.plugins.manager import DEFAULT_PLUGINS as DEFAULT_PLUGINS
from regnde.plugins.manager import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP
from regnde.plugins.manager import ENV_DISABLE as ENV_DISABLE
from regnde.plugins.manager import Registry as Registry
from regnde.plugins.manager import registry as registry
from regnde.plugins.manager import set_registry as set_registry
