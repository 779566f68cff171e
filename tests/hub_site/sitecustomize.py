"""Run at the start of every child process of the test suite (tests/conftest.py puts this folder on
PYTHONPATH): old huggingface_hub releases validate cards against huggingface.co, not HF_ENDPOINT."""

import os

if os.environ.get("HF_ENDPOINT"):
    import card_validation

    if card_validation.needed():
        card_validation.route_card_validation_to_endpoint()
