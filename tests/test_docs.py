"""The code's pointers into README.md and RESULTS.md name sections that exist."""
import glob
import os
import re

from conftest import REPO

CITING = ["loop.sh", "common.py", *glob.glob(os.path.join(REPO, "0*.py")),
          *glob.glob(os.path.join(REPO, "bench", "*.py")), *glob.glob(os.path.join(REPO, "tests", "*.py"))]


def test_every_pointer_into_the_docs_names_a_section_that_exists():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    results = open(os.path.join(REPO, "RESULTS.md"), encoding="utf-8").read()
    readme_headings = re.findall(r"^## (.+)$", readme, re.M)
    results_sections = set(re.findall(r"^## (\d+)\.", results, re.M))
    pointers = 0
    for path in CITING:
        text = open(os.path.join(REPO, path), encoding="utf-8").read()
        if os.path.basename(path) == "test_docs.py":
            continue
        for match in re.finditer(r"\b(README|RESULTS)\b(\.md)?", text):
            after = text[match.end():match.end() + 80]
            if match.group(2) and after[:1] in "\"'":  # a file name in a string ("README.md"): no pointer
                continue
            where = f"{path}:{text.count(chr(10), 0, match.start()) + 1}"
            if match.group(1) == "README":
                cited = re.match(r',\s+\\?"([^"\\]+)', after)
                assert cited, f"{where}: a pointer into the README names no section (README, \"Heading\")"
                assert any(heading.startswith(cited.group(1)) for heading in readme_headings), \
                    f"{where}: README has no section \"{cited.group(1)}\""
            else:
                cited = re.match(r"\s+section\s+(\d+)", after)
                assert cited, f"{where}: a pointer into RESULTS.md names no section (RESULTS.md section N)"
                assert cited.group(1) in results_sections, f"{where}: RESULTS.md has no section {cited.group(1)}"
            pointers += 1
    assert pointers >= 8  # the pointers above were found at all


def test_the_stage_docstrings_start_alike():
    """Each stage's first line: `NN_name.py: what it does`."""
    for path in sorted(glob.glob(os.path.join(REPO, "0*.py"))):
        first = open(path, encoding="utf-8").readline()
        assert first.startswith(f'"""{os.path.basename(path)}: '), first
