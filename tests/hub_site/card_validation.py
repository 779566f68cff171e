"""huggingface_hub before 2.2 (all that transformers up to 5.2x accepts, the floors included) posts a
card's YAML to https://huggingface.co/api/validate-yaml whatever HF_ENDPOINT says; 2.2 and later post
it to the endpoint. `route_card_validation_to_endpoint` sends it to HF_ENDPOINT, as the newer releases
do, so the tests' loopback Hub answers. tests/conftest.py calls it in the test process, and puts this
folder on PYTHONPATH so that `sitecustomize.py` calls it in every child process the tests start."""

import os


def route_card_validation_to_endpoint(repocard=None) -> None:
    """Patch `huggingface_hub.repocard` (imported now unless given) to post to HF_ENDPOINT."""
    if repocard is None:
        from huggingface_hub import repocard

    if getattr(repocard.get_session, "routes_to_endpoint", False):
        return
    session_factory = repocard.get_session

    class ToEndpoint:
        def __init__(self, session):
            self.session = session

        def post(self, url, *args, **kwargs):
            return self.session.post(url.replace("https://huggingface.co", os.environ["HF_ENDPOINT"], 1),
                                     *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.session, name)

    def get_session():
        return ToEndpoint(session_factory())

    get_session.routes_to_endpoint = True
    repocard.get_session = get_session


def needed() -> bool:
    """Whether the installed huggingface_hub sends the validation to huggingface.co (read from its
    metadata: no import of huggingface_hub in children that never use it)."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("huggingface_hub").split(".")[:2])
    return (major, minor) < (2, 2)
