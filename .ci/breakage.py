"""Read a pytest JUnit XML report and print what broke, one line per package, so the cause comes first.

Each failing or erroring test is charged to the installed package whose frame is the last one in its traceback
(the innermost site-packages frame: where the error surfaced upstream); a traceback without one is charged to
vtoken itself. A line gives the package, its installed version, how many tests it broke and the first error.

    python .ci/breakage.py report.xml
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

# a frame in pytest's short form (path:line) or Python's (File "path", line N), also inside a subprocess's output
FRAME = re.compile(r"site-packages/([A-Za-z0-9_]+)[^\s:\"]*(?::\d+|\", line \d+)")
ERROR = re.compile(r"^E\s+(.+)$", re.MULTILINE)
EXCEPTION = re.compile(r"^E\s+((?:[A-Za-z_.]+(?:Error|Exception|Exit))\b.*)$", re.MULTILINE)


def distribution_of(module: str) -> str:
    names = importlib.metadata.packages_distributions().get(module, [])
    return names[0] if names else module


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def failures(report: str):
    """(test id, traceback text, message) of every failed or erroring test case in the report."""
    for case in ET.parse(report).getroot().iter("testcase"):
        for problem in list(case.findall("failure")) + list(case.findall("error")):
            test = f"{case.get('classname', '')}::{case.get('name', '')}"
            yield test, problem.text or "", problem.get("message", "")


def charge(traceback: str) -> tuple[str, str]:
    """(package, file:line) for one traceback: its innermost site-packages frame, else vtoken."""
    frames = list(FRAME.finditer(traceback))
    if not frames:
        return "vtoken", ""
    last = frames[-1]
    return distribution_of(last.group(1)), last.group(0).split("site-packages/", 1)[1].replace('", line ', ":")


def summary(report: str) -> list[str]:
    broken: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for test, traceback, message in failures(report):
        package, where = charge(traceback)
        raised = EXCEPTION.findall(traceback)  # the innermost exception, e.g. one a subprocess printed
        errors = raised[-1:] or ERROR.findall(traceback)
        first = (errors[0] if errors else message).strip()
        broken[package].append((test, first, where))
    lines = []
    for package, cases in sorted(broken.items(), key=lambda item: -len(item[1])):
        test, first, where = cases[0]
        version = "" if package == "vtoken" else " " + version_of(package)
        at = f" at {where}" if where else ""
        lines.append(f"{package}{version}: {len(cases)} test(s) broken; first: {first[:160]}{at} ({test})")
    return lines


if __name__ == "__main__":
    lines = summary(sys.argv[1])
    print("\n".join("   " + line for line in lines) or "   nothing broke")
