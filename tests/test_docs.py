"""The documentation holds together: README.md and every docs/**/*.md link to files and
headings that exist, name repository paths that exist, the README stays short, and every
docs page is reachable from it. Reads files only: no processes, no imports of nanodist."""
import re
import unicodedata

import pytest
from harness import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 260
NOT_LINKED_FROM_README = {"DESIGN.md"}  # design notes, linked from the README's table anyway
# top-level folders whose paths are checked even without a file extension
SOURCE_DIRS = ("nanodist", "nanodist_tools", "bench", "tests", "scripts", "docs", "data")
CHECKED_SUFFIXES = (".py", ".md", ".json", ".sh", ".png", ".sbatch")

FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
PATH_WORD = re.compile(r"^[\w.-]+(?:/[\w.-]+)*/?$")


def pages():
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose_lines(path):
    """(line number, text) of the lines outside fenced code blocks."""
    inside = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lowercase, spaces to '-',
    punctuation other than '-' and '_' removed."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in "-_" or category[0] in "LNM":
            kept.append(ch)
        elif ch == " ":
            kept.append("-")
    return "".join(kept)


def anchors(path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... for repeats."""
    seen, out = {}, set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path):
    """(line number, target) of every markdown link and image outside code."""
    for number, line in prose_lines(path):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            yield number, target


def relative_links(path):
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        yield number, target


def where(path, number):
    return f"{path.relative_to(REPO)}:{number}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for number, target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{where(page, number)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where(page, number)}: {target} (no heading #{anchor} in {dest.name})")
    assert broken == []


def repo_paths(line):
    """The repository paths a line names in backticks: words with a '/' that end in a
    checked file suffix, and paths into one of the source folders that end in '/' or are
    the whole span (`nanodist/parallel/`, `docs/bench`)."""
    for _, span in CODE_SPAN.findall(line):
        words = span.split()
        for word in words:
            word = word.strip("'\"(),;")
            if "/" not in word or not PATH_WORD.match(word) or word.startswith(("/", "..", "./")):
                continue
            in_source = word.split("/")[0] in SOURCE_DIRS
            checked = word.endswith(CHECKED_SUFFIXES) or (in_source and (word.endswith("/") or len(words) == 1))
            if checked:
                yield word


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_backticked_repository_paths_exist(page):
    missing = [f"{where(page, number)}: {path}" for number, line in prose_lines(page)
               for path in repo_paths(line) if not (REPO / path).exists()]
    assert missing == []


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def linked_pages(page) -> set:
    return {(page.parent / target.partition("#")[0]).resolve()
            for _, target in relative_links(page) if target.partition("#")[0]}


def test_every_docs_page_is_linked_from_the_readme():
    linked = linked_pages(README)
    unlinked = [p.name for p in sorted(DOCS.glob("*.md"))
                if p.name not in NOT_LINKED_FROM_README and p.resolve() not in linked]
    assert unlinked == []


def test_every_docs_page_is_reachable_from_the_readme():
    """Pages in docs/ subfolders (benchmark reports, the planner's validation) are reached
    through the topic pages."""
    reached, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        todo += [p for p in linked_pages(page) if p.suffix == ".md" and p.exists()]
    orphans = [str(p.relative_to(REPO)) for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in reached]
    assert orphans == []


def test_the_checker_itself():
    assert slug("Checkpoints, export and the planner") == "checkpoints-export-and-the-planner"
    assert slug("Measured: `bench/pp.py`") == "measured-benchpppy"
    assert slug("Which layout? The planner") == "which-layout-the-planner"
    assert slug("The check: `bench/gpu_check.py`") == "the-check-benchgpu_checkpy"
    assert list(repo_paths("see `nanodist/parallel/fsdp.py` and `python bench/cp.py --x`")) == [
        "nanodist/parallel/fsdp.py", "bench/cp.py"]
    assert list(repo_paths("`error: at nanodist/x.py:12 (...)` `<out_dir>/profile/r.json`")) == []
    assert list(repo_paths("`nanodist/parallel/` `shakespeare_char/` `runs/exp1`")) == ["nanodist/parallel/"]
    line = "[a](b.md#c) ![i](d.png) [w](https://x.org) [`code`](e.py) `[no](code.md)`"
    assert LINK.findall(CODE_SPAN.sub("", line)) == ["b.md#c", "d.png", "https://x.org", "e.py"]
