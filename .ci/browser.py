"""Open the built site (_docs/) in headless Chromium and check it as a reader would.

    python .ci/browser.py

Every page must load in the browser, carry its title, have no broken internal link (file or #anchor), and every
<img> must have loaded (each page reports this itself after its load event, in `data-img-check`). Screenshots of the
home page and one kernel chapter are written to _docs/screenshot-*.png for inspection.
"""
import re, shutil, subprocess, sys, tempfile
from html.parser import HTMLParser
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "_docs"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Page(HTMLParser):
    "Title, links, anchors and the image self-check of one dumped DOM."
    def __init__(self):
        super().__init__(); self.title, self.links, self.ids, self.img_check, self._in_title = "", [], set(), None, False
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a: self.ids.add(a["id"])
        if tag == "title": self._in_title = True
        if tag == "a" and a.get("href"): self.links.append(a["href"])
        if tag == "body": self.img_check = a.get("data-img-check")
    def handle_endtag(self, tag):
        if tag == "title": self._in_title = False
    def handle_data(self, data):
        if self._in_title: self.title += data


def chromium(*args) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None: sys.exit("chromium: expected on PATH (bash .ci/install installs Debian's package), got none")
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)
    return r.stdout


def main():
    pages = sorted(DOCS.glob("*.html"))
    if len(pages) < 2: sys.exit(f"_docs: expected the built site (python .ci/docs.py), got {len(pages)} pages")
    parsed, errors = {}, []
    for p in pages:
        dom = chromium("--virtual-time-budget=10000", "--dump-dom", p.as_uri())
        page = Page(); page.feed(dom); parsed[p.name] = page
        if not dom.strip(): errors.append(f"{p.name}: did not load")
        if not page.title.strip(): errors.append(f"{p.name}: no title")
        if not (page.img_check or "").startswith("ok"): errors.append(f"{p.name}: images {page.img_check!r}")
    for name, page in parsed.items():
        for href in page.links:
            if re.match(r"^[a-z]+:", href): continue                          # external: not checked offline
            target, _, anchor = href.partition("#")
            target = target or name
            if target not in parsed and not (DOCS / target).exists():
                errors.append(f"{name}: broken link {href!r}")
            elif anchor and target in parsed and anchor not in parsed[target].ids:
                errors.append(f"{name}: broken anchor {href!r}")
    for shot, page in (("home", "index.html"), ("kernel-chapter", "kernels.batched.html")):
        chromium(f"--screenshot={DOCS / f'screenshot-{shot}.png'}", "--window-size=1280,1600", (DOCS / page).as_uri())
    if errors: sys.exit("browser check failed:\n  " + "\n  ".join(errors))
    imgs = sum(int(p.img_check.split()[1]) for p in parsed.values())
    print(f"browser check: {len(parsed)} pages loaded with titles, {imgs} images loaded, internal links resolve; "
          f"screenshots in {DOCS}/screenshot-*.png")


if __name__ == "__main__":
    main()
