"""Every link and repository path the documentation and the code's docstrings / comments mention exists.

Checked: relative markdown links ``[text](path#anchor)`` in README.md, docs/, tools/README.md,
launch/README.md and examples/README.md (the file, and the heading for an anchor into a markdown file), and
every mention of a path under a top-level folder of the repository (``docs/<name>.md``, a module under
``gift_megatron/``, a recipe under ``examples/`` ...) in those files, in the docstrings and comments of
every Python file and in the comments of the YAML configs under examples/ and launch/.
"""

from __future__ import annotations

import ast
import glob
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKDOWN = ["README.md", "tools/README.md", "launch/README.md", "examples/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
PY_DIRS = ("gift_megatron", "tools", "launch", "examples", "benchmarks", "tests", "scripts")
TOP = ("docs", "gift_megatron", "examples", "tools", "launch", "benchmarks", "tests", "scripts", "constraints")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# A path under a top-level folder, not part of a longer path or a URL (runs/x/docs/y is not ours).
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/])" % "|".join(TOP))


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md_text: str) -> set[str]:
    text = re.sub(r"```.*?```", "", md_text, flags=re.S)  # headings inside code blocks are not headings
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def broken_links(md_path: str, text: str, root: str = ROOT) -> list[str]:
    """Relative links of markdown ``text`` (the file at ``md_path`` relative to ``root``) that do not resolve."""
    bad = []
    base = os.path.dirname(os.path.join(root, md_path))
    for m in LINK.finditer(re.sub(r"```.*?```", "", text, flags=re.S)):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(root, md_path)
        if not os.path.exists(full):
            bad.append(f"{md_path}: link {target} -> {os.path.relpath(full, root)} does not exist")
        elif anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as fh:
                if anchor not in anchors(fh.read()):
                    bad.append(f"{md_path}: link {target}: no heading #{anchor} in {os.path.relpath(full, root)}")
    return bad


def broken_paths(where: str, text: str, root: str = ROOT) -> list[str]:
    """Repository paths mentioned in ``text`` that do not exist (globs and placeholders excepted)."""
    bad = []
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".")
        follows = text[m.end() : m.end() + 1]
        if "..." in path or follows in ("*", "{", "<") or "X" in os.path.basename(path).split(".")[0].split("_"):
            continue  # a pattern (tools/convert_*.py, tests/test_X.py, gift_megatron/...), not a file
        if not os.path.exists(os.path.join(root, path)):
            bad.append(f"{where}: mentions {path}, which does not exist")
    return bad


def docstrings_and_comments(source: str) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a Python file."""
    out = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((tok.start[0], tok.string))
    return out


def python_files() -> list[str]:
    files = []
    for d in PY_DIRS:
        files += glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)
    return sorted(os.path.relpath(f, ROOT) for f in files)


def test_markdown_links_and_paths_resolve():
    bad = []
    for md in MARKDOWN:
        with open(os.path.join(ROOT, md), encoding="utf-8") as fh:
            text = fh.read()
        bad += broken_links(md, text) + broken_paths(md, text)
    assert not bad, "\n".join(bad)


def test_paths_in_docstrings_and_comments_resolve():
    bad = []
    for py in python_files():
        with open(os.path.join(ROOT, py), encoding="utf-8") as fh:
            source = fh.read()
        for line, text in docstrings_and_comments(source):
            bad += broken_paths(f"{py}:{line}", text)
    assert not bad, "\n".join(bad)


def test_paths_in_yaml_comments_resolve():
    bad = []
    for d in ("examples", "launch"):
        for path in sorted(glob.glob(os.path.join(ROOT, d, "*.yaml"))):
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if "#" in line:
                        bad += broken_paths(f"{os.path.relpath(path, ROOT)}:{n}", line[line.index("#") :])
    assert not bad, "\n".join(bad)


def test_the_checks_catch_broken_links_and_paths():
    """The checker itself: a missing file, a missing heading and a missing path are reported."""
    text = (
        "see [objectives](objectives.md#gift), [gone](missing.md), [bad anchor](objectives.md#no-such-heading),"
        " [web](https://example.com) and docs/objectives.md, docs/nope.md"
    )
    bad = broken_links("docs/x.md", text) + broken_paths("docs/x.md", text)
    assert len(bad) == 3, bad
    assert "missing.md" in bad[0] and "no-such-heading" in bad[1] and "docs/nope.md" in bad[2]
    assert slug("Departures from the papers and the authors' code") == "departures-from-the-papers-and-the-authors-code"
    assert slug("The full z-score gradient (detach_stats: false)") == "the-full-z-score-gradient-detach_stats-false"
    assert broken_paths("x.py:1", "# see gift_megatron/nope.py") != []
