"""The pre-0.5 name of `fdbpl_hf.testing.zoo` (the same module object, so patching either patches both)."""

import sys

from .testing import zoo as _module_now

sys.modules[__name__] = _module_now
