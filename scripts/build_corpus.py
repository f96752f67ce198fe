#!/usr/bin/env python3
"""Build the committed corpus snapshot from Debian's ``python3.11-doc`` package.

Documents: every entry of the CPython changelog (``whatsnew/changelog.html``,
releases 3.5.0a1 .. 3.11.2, 2015-02 .. 2023-02). Category = changelog section
(Library, Core and Builtins, ...), date = the release date of the release that
shipped the entry.

Queries: paragraphs of the "What's New in Python 3.5 .. 3.11" documents that
link to a bpo/gh issue. The query is the paragraph's first sentence (with issue
references and "(Contributed by ...)" removed); the relevant documents are the
changelog entries for the same issue(s). The two texts were written separately
(release notes vs. NEWS entry), so a query is a paraphrase; near-copies (token
Jaccard >= MAX_JACCARD with a relevant title or text) are dropped.

Usage::

    python scripts/build_corpus.py                 # apt-get download the pinned .deb
    python scripts/build_corpus.py --deb FILE.deb  # use a downloaded .deb
    python scripts/build_corpus.py --html-dir /usr/share/doc/python3.11/html

Only the standard library is used; the output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

PACKAGE = "python3.11-doc"
PACKAGE_VERSION = "3.11.2-6+deb12u9"
HTML_PREFIX = "usr/share/doc/python3.11/html/"
CHANGELOG = "whatsnew/changelog.html.gz"
WHATSNEW = [f"whatsnew/3.{minor}.html" for minor in range(5, 12)]

MAX_TEXT = 1500
MAX_QUERY = 250
MAX_TITLE = 160
MAX_RELEVANT = 5
MAX_JACCARD = 0.6

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "data"

# --------------------------------------------------------------------------- HTML


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
BLOCK = {
    "p", "pre", "div", "ul", "ol", "li", "blockquote", "dl", "dt", "dd", "table",
    "tr", "section", "h1", "h2", "h3", "h4", "h5", "h6", "figure",
}
SKIP_CLASSES = {"headerlink"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list["Node | str"] = field(default_factory=list)

    def iter(self, tag: str | None = None) -> Iterator["Node"]:
        if tag is None or self.tag == tag:
            yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter(tag)

    def elements(self) -> list["Node"]:
        return [c for c in self.children if isinstance(c, Node)]

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_html(text: str) -> Node:
    b = _TreeBuilder()
    b.feed(text)
    b.close()
    return b.root


def _blocks(node: Node, out: list[str], buf: list[str], pre: bool = False) -> None:
    for c in node.children:
        if isinstance(c, str):
            buf.append(c)
            continue
        if c.tag in ("script", "style") or c.classes() & SKIP_CLASSES:
            continue
        if c.tag in BLOCK:
            _flush(out, buf, pre)
            inner: list[str] = []
            _blocks(c, out, inner, pre or c.tag == "pre")
            _flush(out, inner, pre or c.tag == "pre")
        elif c.tag == "br":
            buf.append("\n" if pre else " ")
        else:
            _blocks(c, out, buf, pre)


def _flush(out: list[str], buf: list[str], pre: bool) -> None:
    s = "".join(buf)
    buf.clear()
    if pre:
        s = "\n".join(line.rstrip() for line in s.strip("\n").splitlines())
    else:
        s = " ".join(s.split())
    if s.strip():
        out.append(s)


def node_text(node: Node) -> str:
    """Rendered text: whitespace collapsed inside blocks, blocks joined by blank lines."""
    out: list[str] = []
    buf: list[str] = []
    _blocks(node, out, buf)
    _flush(out, buf, False)
    return "\n\n".join(out)


# ------------------------------------------------------------------------ helpers

REF_HREF = [
    (re.compile(r"bugs\.python\.org/issue\?.*?bpo=(\d+)$"), "bpo"),
    (re.compile(r"bugs\.python\.org/issue(\d+)$"), "bpo"),
    (re.compile(r"github\.com/python/cpython/issues/(\d+)$"), "gh"),
]
REF_TEXT = re.compile(r"\b(?:bpo|gh|issue)[- #]?\d+\b", re.I)
LEAD_REFS = re.compile(r"^\s*(?:(?:bpo|gh)-\d+\s*(?:,|and)?\s*)+:\s*")
CONTRIB = re.compile(r"\((?:[^()]|\([^()]*\))*?\b(?:Contributed|Patch|Original patch|Initial patch)\b(?:[^()]|\([^()]*\))*\)", re.S)
SENT_END = re.compile(r"(?<=[a-z0-9)\]'\"`])[.!?](?=\s+[A-Z(:`'\"]|\s*$)")


def refs_in(node: Node) -> list[str]:
    found: list[str] = []
    for a in node.iter("a"):
        href = a.attrs.get("href", "")
        for rx, kind in REF_HREF:
            m = rx.search(href)
            if m:
                ref = f"{kind}-{int(m.group(1))}"
                if ref not in found:
                    found.append(ref)
    return found


def trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    limit -= 2  # room for the " …" marker
    cut = text[:limit]
    for sep in ("\n\n", ". ", " "):
        i = cut.rfind(sep)
        if i > limit * 0.6:
            return cut[: i + (1 if sep == ". " else 0)].rstrip() + " …"
    return cut.rstrip() + " …"


def release_tag(h2: str) -> str:
    m = re.match(r"Python (\d+\.\d+\.\d+)\s*(.*)$", h2.strip())
    if not m:
        raise ValueError(f"unexpected release heading {h2!r}")
    ver, kind = m.groups()
    kinds = {"final": "", "alpha": "a", "beta": "b", "release candidate": "rc"}
    km = re.match(r"(final|alpha|beta|release candidate)\s*(\d*)$", kind)
    if not km:
        raise ValueError(f"unexpected release kind {kind!r}")
    return ver + kinds[km.group(1)] + km.group(2)


# ------------------------------------------------------------------------ sources


def read_sources(args: argparse.Namespace) -> tuple[dict[str, bytes], str]:
    """Return {relative html path: bytes} for the needed files and a provenance note."""
    wanted = [CHANGELOG, *WHATSNEW]
    if args.html_dir:
        base = Path(args.html_dir)
        return {w: (base / w).read_bytes() for w in wanted}, f"html dir {base}"
    if args.deb:
        deb = Path(args.deb)
        raw = deb.read_bytes()
    else:
        with tempfile.TemporaryDirectory(prefix="corpus-src-") as tmp:
            Path(tmp).chmod(0o777)  # apt-get download runs as the _apt user
            subprocess.run(
                ["apt-get", "download", f"{PACKAGE}={PACKAGE_VERSION}"], cwd=tmp, check=True
            )
            deb = next(Path(tmp).glob("*.deb"))
            raw = deb.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    files = _read_deb(raw, {HTML_PREFIX + w: w for w in wanted})
    missing = set(wanted) - set(files)
    if missing:
        raise SystemExit(f"missing in {deb}: {sorted(missing)}")
    return files, f"{deb.name} sha256={sha}"


def _read_deb(raw: bytes, wanted: dict[str, str]) -> dict[str, bytes]:
    """Extract members of a .deb (ar archive + data.tar.*) with the standard library."""
    if not raw.startswith(b"!<arch>\n"):
        raise SystemExit("not a .deb (ar) file")
    pos = 8
    while pos < len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise SystemExit("zstd data.tar not supported; use --html-dir")
            data = lzma.decompress(body) if name.endswith(".xz") else body
            out: dict[str, bytes] = {}
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
                for m in tf:
                    key = m.name.lstrip("./")
                    if key in wanted and m.isfile():
                        f = tf.extractfile(m)
                        assert f is not None
                        out[wanted[key]] = f.read()
            return out
    raise SystemExit("no data.tar member in .deb")


# ------------------------------------------------------------------------ build


def headline(text: str) -> str:
    """The entry's first sentence (its own summary line), trimmed to MAX_TITLE chars."""
    first = sentences(text.split("\n\n", 1)[0])[0]
    return trim(first, MAX_TITLE)


def build_documents(changelog_html: str) -> tuple[list[dict], dict[str, list[str]]]:
    root = parse_html(changelog_html)
    docs: list[dict] = []
    by_ref: dict[str, list[str]] = {}
    seen_ids: Counter[str] = Counter()
    for rel_sec in root.iter("section"):
        h2 = next((e for e in rel_sec.elements() if e.tag == "h2"), None)
        if h2 is None:
            continue
        release = release_tag(node_text(h2))
        date = None
        for e in rel_sec.elements():
            if e.tag == "p":
                m = re.search(r"Release date:\s*(\d{4}-\d{2}-\d{2})", node_text(e))
                if m:
                    date = m.group(1)
                    break
        if date is None:
            raise ValueError(f"no release date for {release}")
        for cat_sec in (e for e in rel_sec.elements() if e.tag == "section"):
            h3 = next((e for e in cat_sec.elements() if e.tag == "h3"), None)
            if h3 is None:
                continue
            category = node_text(h3)
            for ul in (e for e in cat_sec.elements() if e.tag == "ul"):
                for li in (e for e in ul.elements() if e.tag == "li"):
                    full = node_text(li)
                    refs = refs_in(li)
                    lead = LEAD_REFS.match(full)
                    text = full[lead.end():] if lead else full
                    own = [r for r in refs if lead and r in lead.group(0)] or refs[:1]
                    text = trim(text.strip(), MAX_TEXT)
                    if len(text) < 10:
                        continue
                    key = f"{release}:{own[0] if own else 'entry'}"
                    seen_ids[key] += 1
                    doc_id = key if seen_ids[key] == 1 else f"{key}~{seen_ids[key]}"
                    title = headline(text)
                    docs.append(
                        {"id": doc_id, "title": title, "text": text, "category": category, "date": date}
                    )
                    for r in own:
                        by_ref.setdefault(r, []).append(doc_id)
    return docs, by_ref


def sentences(text: str) -> list[str]:
    out, start = [], 0
    for m in SENT_END.finditer(text):
        out.append(text[start : m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


CREDIT = re.compile(r"\b(?:contributed|patch(?:ed)?|implemented|written|proposed|suggested) by\b", re.I)
TOKEN = re.compile(r"[a-z0-9_]+")


def clean_query(text: str) -> str:
    """First sentence of a What's New paragraph, without issue refs and credits."""
    text = CONTRIB.sub(" ", text)
    text = REF_TEXT.sub("\x00", text)
    text = re.sub(r"\(\s*\x00(?:\s*(?:,|;|and)?\s*\x00)*\s*\)", " ", text)  # "(bpo-1, bpo-2)"
    text = re.sub(r"\s*\b(?:in|see|and)?\s*\x00(?:\s*(?:,|;|and)?\s*\x00)*", " ", text)
    text = re.sub(r"\s+([.,;:])", r"\1", " ".join(text.split()))
    kept = [s for s in sentences(text) if not CREDIT.search(s)]
    return trim(kept[0], MAX_QUERY).strip() if kept else ""


def jaccard(a: str, b: str) -> float:
    ta, tb = set(TOKEN.findall(a.lower())), set(TOKEN.findall(b.lower()))
    return len(ta & tb) / max(1, len(ta | tb))


def build_queries(
    whatsnew: dict[str, str], by_ref: dict[str, list[str]], texts: dict[str, tuple[str, str]]
) -> list[dict]:
    queries: list[dict] = []
    seen_text: set[str] = set()
    for name in WHATSNEW:
        ver = name.split("/")[-1].removesuffix(".html")
        root = parse_html(whatsnew[name])
        body = next((d for d in root.iter("div") if d.attrs.get("role") == "main"), root)
        n = 0
        for p in body.iter("p"):
            refs = refs_in(p)
            relevant: list[str] = []
            for r in refs:
                for d in by_ref.get(r, []):
                    if d not in relevant:
                        relevant.append(d)
            if not relevant or len(relevant) > MAX_RELEVANT:
                continue
            q = clean_query(node_text(p))
            if len(q.split()) < 4 or q.lower() in seen_text:
                continue
            # Near-copies of the NEWS entry would make retrieval trivial: drop them.
            if max(jaccard(q, t) for d in relevant for t in texts[d]) >= MAX_JACCARD:
                continue
            seen_text.add(q.lower())
            n += 1
            queries.append({"id": f"whatsnew-{ver}-{n:03d}", "query": q, "relevant": relevant})
    return queries


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)
    with open(path, "wb") as raw:
        # mtime=0 and no filename make the gzip bytes deterministic.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(payload.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--deb", help=f"path to {PACKAGE}_{PACKAGE_VERSION}_all.deb")
    src.add_argument("--html-dir", help="installed docs dir, e.g. /usr/share/doc/python3.11/html")
    ap.add_argument("--out", default=str(OUT_DIR), help="output directory (default: data/)")
    args = ap.parse_args(argv)

    files, provenance = read_sources(args)
    changelog = gzip.decompress(files[CHANGELOG]).decode("utf-8")
    docs, by_ref = build_documents(changelog)
    texts = {d["id"]: (d["title"], d["text"]) for d in docs}
    queries = build_queries({w: files[w].decode("utf-8") for w in WHATSNEW}, by_ref, texts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(out / "corpus.jsonl.gz", docs)
    with open(out / "queries.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for q in queries:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")

    cats = Counter(d["category"] for d in docs)
    dates = sorted(d["date"] for d in docs)
    print(f"source: {provenance}", file=sys.stderr)
    print(f"documents: {len(docs)}  ids unique: {len({d['id'] for d in docs}) == len(docs)}")
    print(f"date range: {dates[0]} .. {dates[-1]}")
    print("categories:", dict(sorted(cats.items(), key=lambda kv: -kv[1])))
    print(f"queries: {len(queries)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
