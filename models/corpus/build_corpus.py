#!/usr/bin/python3
"""Builds the English prose corpus the reference models are trained on.

Source: the Python 3.11 documentation as Debian ships it (package
python3.11-doc, HTML under /usr/share/doc/python3.11/html), licensed under
the PSF License Version 2 (see LICENSE.md here). Only the standard library is
used, so this runs wherever Debian's apt does:

  models/corpus/build_corpus.py                  # downloads the .deb, writes models/corpus
  models/corpus/build_corpus.py --html /usr/share/doc/python3.11/html --out DIR

Writes DIR/train.txt, DIR/validation.txt and DIR/manifest.json (package
version, file counts, byte counts, sha256 of each split). The text is the main
body of every page in the prose sections, block elements on their own lines,
code blocks kept as written. Pages are split by a hash of their path, so the
split does not depend on which other pages exist.
"""

import argparse
import glob
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import tempfile

PACKAGE = "python3.11-doc"
# Sections that are mostly prose; the C API, indexes and search pages are not.
SECTIONS = ["tutorial", "reference", "howto", "faq", "using", "library", "whatsnew",
            "extending", "installing", "distributing"]
# About one page in 24 goes to validation.
VALIDATION_BUCKETS = 24
BLOCK_TAGS = {"p", "div", "pre", "li", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd",
              "tr", "table", "blockquote", "section", "br", "dl", "ul", "ol"}


class MainText(html.parser.HTMLParser):
    """Collects the text inside <div role="main">, without scripts, styles and
    the pilcrow links Sphinx adds after headings."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0          # div nesting inside the main div; 0 = outside
        self.skip = 0           # inside script/style/headerlink
        self.pre = 0
        self.parts = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0:
            if tag == "div" and attrs.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in ("script", "style") or "headerlink" in (attrs.get("class") or ""):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag in ("script", "style") or (tag == "a" and self.skip):
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth == 0 or self.skip:
            return
        if self.pre:
            self.parts.append(data)
            return
        data = re.sub(r"\s+", " ", data)
        if not self.parts or self.parts[-1].endswith("\n"):
            data = data.lstrip()
        self.parts.append(data)

    def text(self):
        lines = [line.rstrip() for line in "".join(self.parts).split("\n")]
        out, blank = [], True
        for line in lines:
            if not line.strip():
                if not blank:
                    out.append("")
                blank = True
                continue
            out.append(line)
            blank = False
        return "\n".join(out).strip() + "\n"


def page_text(path):
    parser = MainText()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    return parser.text()


def fetch_html():
    """Downloads and unpacks the package; returns (html dir, version)."""
    work = tempfile.mkdtemp(prefix="icd-corpus-")
    subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True)
    deb = glob.glob(os.path.join(work, PACKAGE + "_*.deb"))[0]
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(work, "x")], check=True)
    version = os.path.basename(deb).split("_")[1]
    return os.path.join(work, "x/usr/share/doc/python3.11/html"), version


def installed_version():
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="directory for the splits and manifest (default: beside this script; "
                         "validation.txt and manifest.json are checked in, train.txt is not)")
    ap.add_argument("--html", help="an unpacked html directory (default: apt-get download)")
    args = ap.parse_args()

    html_dir, version = (args.html, installed_version()) if args.html else fetch_html()
    pages = sorted(p for s in SECTIONS
                   for p in glob.glob(os.path.join(html_dir, s, "**", "*.html"), recursive=True))
    if not pages:
        sys.exit("no pages under %s" % html_dir)
    splits = {"train": [], "validation": []}
    counts = {"train": 0, "validation": 0}
    for path in pages:
        rel = os.path.relpath(path, html_dir)
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % VALIDATION_BUCKETS
        split = "validation" if bucket == 0 else "train"
        text = page_text(path)
        if len(text) < 200:  # navigation stubs
            continue
        splits[split].append(text)
        counts[split] += 1

    os.makedirs(args.out, exist_ok=True)
    manifest = {"source": "Debian package %s %s" % (PACKAGE, version),
                "license": "PSF License Version 2 (models/corpus/LICENSE.md)",
                "sections": SECTIONS, "validation_buckets": VALIDATION_BUCKETS,
                "command": "models/corpus/build_corpus.py " + " ".join(sys.argv[1:])}
    for split, texts in splits.items():
        data = "\n".join(texts).encode("utf-8")
        with open(os.path.join(args.out, split + ".txt"), "wb") as f:
            f.write(data)
        manifest[split] = {"pages": counts[split], "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
