"""Write constraints/tested.txt: the exact versions of everything `pip install -e ".[test]"` brought
into this environment, as pip constraints (`make install` applies them; `make install CONSTRAINTS=`
does not).

    .venv/bin/python constraints/freeze_tested.py > constraints/tested.txt

The walk starts at fdbpl-hf's requirements with the `test` extra and stops at torch: torch and what
only torch needs (sympy, networkx, triton, the CUDA wheels ...) stay out, so a GPU machine's own
torch (`make TORCH_SPEC=...`) is never forced to another build or its dependencies to other versions.
"""

import platform
import re
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT, EXTRAS, STOP = "fdbpl-hf", {"test"}, {"torch"}


def requirements(dist: metadata.Distribution, extras: set[str]) -> list[Requirement]:
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        env = default_environment()
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def closure() -> dict[str, str]:
    pinned: dict[str, str] = {}
    todo = [(ROOT, EXTRAS)]
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        for req in requirements(dist, extras):
            key = canonicalize_name(req.name)
            if key in STOP or key in pinned:
                continue
            try:
                pinned[key] = metadata.version(req.name)
            except metadata.PackageNotFoundError:  # an optional dependency this platform did not install
                continue
            todo.append((req.name, set(req.extras)))
    return pinned


def main() -> None:
    pinned = closure()
    if canonicalize_name(ROOT) in pinned:
        del pinned[canonicalize_name(ROOT)]
    print("# The versions `make test` last passed with (Python "
          f"{platform.python_version()}, {platform.machine()}); torch and its own dependencies are left out.")
    print("# Regenerate: .venv/bin/python constraints/freeze_tested.py > constraints/tested.txt")
    for key in sorted(pinned):
        print(f"{key}=={pinned[key]}")


if __name__ == "__main__":
    sys.exit(main())
