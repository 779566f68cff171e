"""Release metadata: fdbpl_hf/version.py is the one place the version is set; every other file
that states it (CITATION.cff, the CHANGELOG's top entry) must agree with it."""

import os
import re

import yaml

from fdbpl_hf.version import __version__

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_AUTHORS = ["Zherui Zhang", "Jiaxin Wu", "Changwei Wang", "Rongtao Xu", "Longzhao Huang", "Wenhao Xu",
                 "Wenbo Xu", "Li Guo", "Shibiao Xu"]  # arXiv 2505.18053, in the paper's order


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_citation_states_the_package_version_and_the_papers_authors():
    with open(os.path.join(REPO, "CITATION.cff"), encoding="utf-8") as f:
        cff = yaml.safe_load(f)
    assert str(cff["version"]) == __version__, "CITATION.cff's version: set it to fdbpl_hf/version.py's"
    paper = cff["preferred-citation"]
    assert [f"{a['given-names']} {a['family-names']}" for a in paper["authors"]] == PAPER_AUTHORS
    assert {"type": "other", "value": "arXiv:2505.18053"}.items() <= paper["identifiers"][0].items()


def test_changelog_top_entry_is_the_package_version_or_the_next_unreleased_one():
    with open(os.path.join(REPO, "CHANGELOG.md"), encoding="utf-8") as f:
        headings = re.findall(r"^## (\d+\.\d+\.\d+)( \(unreleased\))?\s*$", f.read(), flags=re.M)
    assert headings, "CHANGELOG.md has no '## X.Y.Z' entry"
    (top, unreleased), released = headings[0], [v for v, u in headings if not u]
    if top == __version__:  # released, or being prepared under its own number
        return
    # a release being prepared above the current version: "## X.Y.Z (unreleased)", X.Y.Z later
    assert unreleased and version_key(top) > version_key(__version__), (
        f"CHANGELOG's top entry {top} is not fdbpl_hf/version.py's {__version__} nor a later unreleased one")
    assert released and released[0] == __version__, f"CHANGELOG's latest release {released[:1]} is not {__version__}"


def test_setup_cfg_floors_are_the_pins_of_constraints_floors():
    """setup.cfg's ">=" floors are what `make test-floors` installs: a floor raised in one place only
    would declare a version no test ran on."""
    import configparser

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    lines = cfg["options"]["install_requires"].split("\n") + cfg["options.extras_require"]["test"].split("\n")
    declared = {}
    for line in filter(None, (line.strip() for line in lines)):
        req = Requirement(line)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        assert len(floors) == 1, f"setup.cfg: {line!r} has no '>=' floor"
        declared[canonicalize_name(req.name)] = floors[0]
    pins = {}
    with open(os.path.join(REPO, "constraints", "floors.txt"), encoding="utf-8") as f:
        for line in filter(None, (line.split("#", 1)[0].strip() for line in f)):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert set(pins) == set(declared)
    for name, floor in declared.items():
        # setup.cfg may write 2.11 for the pin 2.11.0
        assert version_key(pins[name]) == version_key(floor) + (0,) * (len(version_key(pins[name])) - len(
            version_key(floor))), f"{name}: setup.cfg says >={floor}, constraints/floors.txt pins {pins[name]}"
