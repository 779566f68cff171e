"""Exit non-zero unless every `name==version` line of a constraints file is what this environment
has installed (`make test-floors` runs it: a floors run that tested other versions proves nothing).

    python constraints/check_installed.py constraints/floors.txt
"""

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version


def mismatches(path: str) -> list[str]:
    wrong = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if len(pins) != 1:
                wrong.append(f"{path}:{number}: {line!r} is not one exact 'name==version' pin")
                continue
            try:
                installed = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                wrong.append(f"{path}:{number}: {req.name} is not installed")
                continue
            # a local build tag (torch 2.13.0+cpu) is the same release as its pin
            if Version(installed).public != Version(pins[0]).public:
                wrong.append(f"{path}:{number}: {req.name} {installed} is installed, not {pins[0]}")
    return wrong


if __name__ == "__main__":
    problems = mismatches(sys.argv[1])
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{sys.argv[1]}: {'every pin installed' if not problems else f'{len(problems)} pins not installed'}")
    sys.exit(1 if problems else 0)
