"""Import the MONAI Deploy App SDK without running MONAI core's eager start-up.

``monai.deploy`` lives inside the ``monai`` package, so ``import monai.deploy`` first runs
``monai/__init__.py``, which imports every MONAI core subpackage (networks, transforms, bundle, a
BERT model for ``transchex``...): 4.3 s of a 9 s app run on the 2-core machine, for code the apps
never call (neither the SDK's core nor onevlm's operators import MONAI core). Registering ``monai``
as a plain package (its folder as ``__path__``, its ``__init__`` not run) before the SDK is
imported keeps every ``monai.<x>`` import working, each loading just that subpackage; the SDK
then imports in about 1.2 s. Set ``ONEVLM_MONAI_EAGER=1`` to import MONAI the ordinary way.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

EAGER_ENV = "ONEVLM_MONAI_EAGER"


def register_monai_lazily() -> bool:
    """Register ``monai`` without running its ``__init__``; False when it is imported already or opted out."""
    if "monai" in sys.modules or os.environ.get(EAGER_ENV, "").strip() in ("1", "true", "yes"):
        return False
    spec = importlib.util.find_spec("monai")
    if spec is None or not spec.submodule_search_locations:
        return False  # not installed: the SDK import below reports it
    package = types.ModuleType("monai", doc="MONAI, registered without its eager __init__ (see apps.monai_core_skip)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__spec__ = spec
    sys.modules["monai"] = package
    return True
