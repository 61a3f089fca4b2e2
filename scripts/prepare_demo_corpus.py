"""Extract plain English text from Debian documentation packages into the demo model's training corpus.

    apt-get install python3.11-doc linux-doc-6.1
    python scripts/prepare_demo_corpus.py --out .demo_corpus

Reads the reStructuredText sources that Sphinx ships beside the HTML (``_sources/**/*.rst.txt``), strips the
markup (directives, code and literal blocks, doctests, tables, roles, link targets), reflows paragraphs, and writes:

- ``train.jsonl``: one training document per line, ``{"source", "title", "sections": [{"title", "text"}]}``;
- ``valid.txt`` and ``test.txt``: held-out documents as plain text (every 40th document, and every 40th
  shifted by 20: one document in 20 is held out). ``valid`` is watched during training, ``test`` only reported;
- ``manifest.json``: packages, versions, licences, counts, bytes and sha256 of each file.

Documents are ordered by package and path, so the split is the same on every machine. Translations (the kernel's
``translations/``) are left out: the corpus is English. Never imported by the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = {
    "python3.11-doc": ("/usr/share/doc/python3.11/html/_sources", "PSF-2.0 (Python Software Foundation License "
                       "Version 2; see /usr/share/doc/python3.11-doc/copyright)"),
    "linux-doc-6.1": ("/usr/share/doc/linux-doc-6.1/html/_sources", "GPL-2.0 (see "
                      "/usr/share/doc/linux-doc-6.1/copyright)"),
}
SKIP_DIRS = ("translations/",)  # the kernel's Chinese, Japanese, Korean, Italian, Spanish... translations
HELD_OUT_EVERY = 40  # document i goes to valid if i % 40 == 0, to test if i % 40 == 20

# Directives whose whole block is markup or code, not prose.
SKIP_DIRECTIVES = {
    "code-block", "code", "sourcecode", "literalinclude", "doctest", "testcode", "testsetup", "testoutput",
    "testcleanup", "productionlist", "toctree", "image", "figure", "kernel-doc", "kernel-abi", "kernel-feat",
    "kernel-include", "include", "raw", "highlight", "index", "tabularcolumns", "csv-table", "list-table", "table",
    "flat-table", "graphviz", "math", "parsed-literal", "sectionauthor", "moduleauthor", "codeauthor", "contents",
    "cssclass", "rst-class", "default-domain", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "currentmodule", "module", "program", "audit-event", "audit-event-table", "impl-detail", "availability",
    "only", "ifconfig", "literal", "kernel-cmd", "maintainers-include", "cpp:namespace", "sidebar", "topic",
    "cmdoption", "option", "envvar", "opcode", "pdbcommand", "2to3fixer", "describe", "rubric", "glossary",
    "line-block", "centered", "hlist", "container", "role", "unicode", "date", "replace", "c:macro",
}
# Directives that document an API object: the argument (a signature) stays as a line, the body as prose.
OBJECT_DIRECTIVE = re.compile(r"^(py:|c:|cpp:)?(function|class|method|classmethod|staticmethod|attribute|data|"
                              r"exception|decorator|decoratormethod|coroutinefunction|coroutinemethod|"
                              r"abstractmethod|property|member|type|var|struct|union|enum|enumerator|macro)$")

HEADING_CHARS = set("=-~^*#\"'+`:._")
INLINE = [
    (re.compile(r":[\w:.+-]+:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),  # :ref:`text <target>` -> text
    (re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?"), r"\1"),  # `text <url>`_ -> text
    (re.compile(r"`([^`]+)`__?"), r"\1"),  # `text`_ -> text
    (re.compile(r"``([^`]+)``"), r"\1"),  # ``literal`` -> literal
    (re.compile(r"`([^`]+)`"), r"\1"),  # `interpreted text` -> interpreted text
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])"), r"\1"),
    (re.compile(r"\s*\[(?:#\w*|\d+|\*)\]_"), ""),  # footnote references
    (re.compile(r"\|([\w -]+)\|_?"), r"\1"),  # substitutions
    (re.compile(r"\\(.)"), r"\1"),  # backslash escapes
]
ROLE = re.compile(r":([\w:.+-]+):`([^`]*)`")


def _role(m: re.Match) -> str:
    text = m.group(2).strip()
    if "<" in text and text.endswith(">"):
        return text[: text.index("<")].strip()
    if text.startswith("~"):  # :func:`~os.path.join` shows as join()
        text = text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def inline(text: str) -> str:
    text = ROLE.sub(_role, text)
    for pattern, repl in INLINE:
        text = pattern.sub(repl, text)
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_underline(line: str, title: str) -> bool:
    s = line.rstrip()
    return len(s) >= 3 and len(set(s)) == 1 and s[0] in HEADING_CHARS and len(s) >= len(title.rstrip()) - 2


def _skip_block(lines: list[str], i: int, base: int) -> int:
    """Index of the first line after the block that starts at ``i`` (blank lines or lines indented past ``base``)."""
    n = len(lines)
    while i < n and (not lines[i].strip() or _indent(lines[i]) > base):
        i += 1
    return i


def parse_rst(text: str) -> list[Section]:
    """Sections of plain paragraphs from one reST document (the first section holds the document's title)."""
    lines = text.expandtabs(8).splitlines()
    sections = [Section("")]
    paragraph: list[str] = []
    literal_next = False  # the previous paragraph ended in '::': the indented block after it is code

    def flush() -> None:
        nonlocal literal_next
        if paragraph:
            joined = " ".join(paragraph)
            literal_next = joined.rstrip().endswith("::")
            joined = re.sub(r"::$", ":", re.sub(r"\s+::$", "", joined.rstrip()))  # 'text::' and 'text: ::' end ':'
            joined = "" if joined == ":" else joined
            cleaned = inline(joined)
            if cleaned and sum(c.isalpha() for c in cleaned) >= 0.5 * len(cleaned) and len(cleaned.split()) >= 3:
                sections[-1].paragraphs.append(cleaned)
            elif cleaned and re.match(r"^[A-Z].*[.:!?]$", cleaned):  # short sentences too
                sections[-1].paragraphs.append(cleaned)
            paragraph.clear()

    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            continue
        indent = _indent(line)
        if literal_next and not paragraph and indent > 0:  # literal block after '::'
            i = _skip_block(lines, i, 0 if indent else -1)
            literal_next = False
            continue
        literal_next = literal_next and bool(paragraph)
        # Headings: over- and underlined, or underlined.
        if (i + 2 < n and _is_underline(line, lines[i + 1]) and lines[i + 1].strip()
                and _is_underline(lines[i + 2], lines[i + 1]) and not paragraph):
            flush()
            sections.append(Section(inline(lines[i + 1])))
            i += 3
            continue
        if i + 1 < n and not paragraph and indent == 0 and _is_underline(lines[i + 1], line) \
                and not _is_underline(line, line):
            flush()
            sections.append(Section(inline(line)))
            i += 2
            continue
        if _is_underline(line, line) and not paragraph:  # a transition (-----)
            i += 1
            continue
        if stripped.startswith(".. ") or stripped == "..":
            flush()
            m = re.match(r"\.\.\s+([\w:.+-]+)::\s*(.*)$", stripped)
            if m is None:  # a comment, a link target or a footnote: skip the block
                i = _skip_block(lines, i + 1, indent)
                continue
            name, argument = m.group(1), m.group(2)
            if name in SKIP_DIRECTIVES or name.split(":")[-1] in SKIP_DIRECTIVES:
                i = _skip_block(lines, i + 1, indent)
                continue
            if OBJECT_DIRECTIVE.match(name) and argument:
                sections[-1].paragraphs.append(inline(argument))
            elif argument and name in ("note", "warning", "seealso", "tip", "important", "hint", "caution",
                                        "attention", "danger", "error", "admonition", "deprecated",
                                        "versionadded", "versionchanged", "deprecated-removed"):
                if name.startswith(("version", "deprecated")):
                    paragraph.append(f"{name.replace('version', 'Version ').capitalize()} {argument}".replace(
                        "Version added", "New in version").replace("Version changed", "Changed in version"))
                else:
                    paragraph.append(argument)
            i += 1
            while i < n and lines[i].strip().startswith(":") and _indent(lines[i]) > indent:  # options
                i += 1
            continue
        if stripped.startswith(">>>"):  # doctest: up to the next blank line
            flush()
            while i < n and lines[i].strip():
                i += 1
            continue
        if stripped.startswith(("+-", "+=")) or re.match(r"^=+( +=+)+\s*$", stripped):  # tables
            flush()
            i = _skip_table(lines, i)
            continue
        if re.match(r"^([-*+•]|#\.|\d+[.)]|\(\d+\))\s+\S", stripped) or re.match(r"^:[\w -]+:(\s|$)", stripped):
            flush()  # a list item or a field starts its own paragraph
        paragraph.append(stripped)
        i += 1
    flush()
    return [s for s in sections if s.paragraphs or s.title]


def _skip_table(lines: list[str], i: int) -> int:
    n = len(lines)
    if lines[i].strip().startswith("+"):
        while i < n and lines[i].strip().startswith(("+", "|")):
            i += 1
        return i
    borders = 0
    while i < n:
        s = lines[i].strip()
        if re.match(r"^=+( +=+)*\s*$", s):
            borders += 1
            if borders >= 2 and (i + 1 >= n or not lines[i + 1].strip()):
                return i + 1
        i += 1
    return i


def render(title: str, sections: list[Section]) -> str:
    """A document as Markdown-like plain text: '# Title', then '## Section' headings and paragraphs."""
    out = [f"# {title}"]
    for s in sections:
        if s.title and s.title != title:
            out.append(f"## {s.title}")
        out.extend(s.paragraphs)
    return "\n\n".join(out)


def documents(package: str, root: Path):
    for path in sorted(root.rglob("*.txt")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(SKIP_DIRS):
            continue
        sections = parse_rst(path.read_text(encoding="utf-8", errors="replace"))
        titled = [s for s in sections if s.title]
        title = titled[0].title if titled else rel.removesuffix(".rst.txt")
        if sum(len(p) for s in sections for p in s.paragraphs) < 200:  # an index or a stub
            continue
        yield f"{package}/{rel.removesuffix('.rst.txt').removesuffix('.txt')}", title, sections


def package_version(name: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".demo_corpus"))
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), choices=list(PACKAGES))
    args = parser.parse_args()
    docs = []
    for package in args.packages:
        root = Path(PACKAGES[package][0])
        if not root.is_dir():
            raise SystemExit(f"error: {root} is missing; install it first: apt-get install {package}")
        docs.extend(documents(package, root))
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "valid": [], "test": []}
    for i, doc in enumerate(docs):
        split = "valid" if i % HELD_OUT_EVERY == 0 else "test" if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2 else "train"
        splits[split].append(doc)
    with open(args.out / "train.jsonl", "w", encoding="utf-8") as f:
        for source, title, sections in splits["train"]:
            f.write(json.dumps({"source": source, "title": title, "sections": [
                {"title": s.title, "text": s.text} for s in sections]}, ensure_ascii=False) + "\n")
    for split in ("valid", "test"):
        text = "\n\n\n".join(render(title, sections) for _, title, sections in splits[split]) + "\n"
        (args.out / f"{split}.txt").write_text(text, encoding="utf-8")
    files = {}
    for name in ("train.jsonl", "valid.txt", "test.txt"):
        data = (args.out / name).read_bytes()
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "packages": [{"name": p, "version": package_version(p), "licence": PACKAGES[p][1],
                      "files": PACKAGES[p][0] + "/**/*.txt"} for p in args.packages],
        "documents": {k: len(v) for k, v in splits.items()},
        "held_out": f"document i (sorted by package and path) is valid if i % {HELD_OUT_EVERY} == 0, "
                    f"test if i % {HELD_OUT_EVERY} == {HELD_OUT_EVERY // 2}",
        "files": files,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(v["bytes"] for v in files.values())
    print(f"{len(docs)} documents ({', '.join(f'{k} {len(v)}' for k, v in splits.items())}), "
          f"{total / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
