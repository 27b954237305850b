"""The unity translation unit of the collective backend lists every source file of its folder,
so a new file cannot be silently left out of the build."""

import pathlib
import re

COLLECTIVE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "collective"


def test_unity_build_includes_every_collective_source():
    sources = {p.name for p in COLLECTIVE.glob("*.cpp")} - {"unity_build.cpp"}
    included = set(re.findall(r'#include "(\w+\.cpp)"', (COLLECTIVE / "unity_build.cpp").read_text()))
    assert included == sources
