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
