"""Run at the start of every child process of the test suite (tests/conftest.py puts this folder on
PYTHONPATH): old huggingface_hub releases validate cards against huggingface.co, not HF_ENDPOINT.
huggingface_hub is not imported here (it reads HF_ENDPOINT once, at import, and an xdist worker sets
its own endpoint later): its repocard module is patched when something imports it."""

import importlib.abc
import importlib.util
import os
import sys


class _PatchRepocardOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "huggingface_hub.repocard":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            import card_validation

            card_validation.route_card_validation_to_endpoint(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("HF_ENDPOINT"):
    import card_validation

    if card_validation.needed():
        sys.meta_path.insert(0, _PatchRepocardOnImport())
