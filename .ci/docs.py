"""Build the documentation site without Quarto (which cannot be installed on machines without internet access).

    python .ci/docs.py            -> _docs/  (a static HTML site: one page per notebook, sidebar in reading order)

Steps: regenerate the notebooks; execute each on the CPU with execnb (a worker process per core), skipping the cells
nbdev_test skips (`#| gpu`, `#| notest`, `#| eval: false`) and the test cells (`#| test NAME`: pytest runs them as
the exported tests, so each runs once in CI; they show as code, and a cell after one that needs its names fails the
build), so outputs and figures are fresh; run nbdev's own processing into _proc/ (what
`nbdev_docs` hands to Quarto: show_doc for every export, doclinks, Quarto cell options); render each processed page
with pandoc (the pypandoc-binary wheel), honouring the cell options nbdev emits (echo, include, output), with a
sidebar from nbdev's sidebar.yml. Where `quarto` is on PATH, `nbdev_docs` renders the same _proc/ with Quarto.
"""
import html, json, multiprocessing, os, re, shutil, subprocess, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS, PROC, DOCS = ROOT / "nbs", ROOT / "_proc", ROOT / "_docs"
OPT = re.compile(r"^#\|\s*([\w-]+)\s*:\s*(.*)$")
SKIP = {"gpu", "notest", "test"}     # test cells: pytest runs them (tests/, from .ci/regen.py)


def execute(nb_path: Path):
    "Run a notebook's cells but the skipped ones top to bottom (cwd = nbs/), and save its outputs into the .ipynb."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.process import extract_directives
    nb = read_nb(nb_path)
    def skip(cell):
        if cell.cell_type != "code": return False
        d = extract_directives(cell, remove=False)
        return bool(SKIP & set(d)) or d.get("eval:", [""])[0].lower() == "false"
    skipped = {id(c) for c in nb.cells if skip(c)}
    saved = {id(c): (c.source, c.cell_type) for c in nb.cells if id(c) in skipped}
    for c in nb.cells:
        if id(c) in skipped: c.source = ""                         # keep the cell, run nothing
    os.chdir(NBS)
    main = sys.modules["__main__"]            # IPython's shell replaces it; the pool's next task is found in this one
    try: CaptureShell().run_all(nb, exc_stop=True)
    except BaseException as e: raise RuntimeError(f"{nb_path.name}: a cell failed: {type(e).__name__}: {e}") from e
    finally: sys.modules["__main__"] = main
    for c in nb.cells:
        if id(c) in saved: c.source = saved[id(c)][0]
    write_nb(nb, nb_path)


def clean_for_pandoc(nb: dict) -> dict:
    "Apply the Quarto cell options nbdev emits (include/echo/output), drop directive lines and empty cells."
    cells = []
    for c in nb["cells"]:
        src = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
        opts, body = {}, []
        for line in src.splitlines():
            m = OPT.match(line)
            if m: opts[m.group(1)] = m.group(2).strip().strip('"').lower()
            elif not line.startswith("#|"): body.append(line)
        if opts.get("include") == "false": continue
        c = dict(c, source="\n".join(body).strip("\n"))
        if c["cell_type"] == "code":
            if opts.get("echo") == "false": c["source"] = ""
            if opts.get("output") == "false": c["outputs"] = []
            c["outputs"] = [_norm(o) for o in c.get("outputs", []) if o.get("output_type") != "stream" or o.get("name") != "stderr"]
            c = {k: v for k, v in c.items() if k in ("cell_type", "execution_count", "id", "metadata", "outputs", "source")}
            if not c["source"] and not c["outputs"]: continue
            md = [o["data"]["text/markdown"] for o in c["outputs"] if "text/markdown" in o.get("data", {})]
            if md and len(md) == len(c["outputs"]):   # markdown output (show_doc, a table): render it as a page section
                as_md = {"cell_type": "markdown", "metadata": {}, "id": c.get("id", "x") + "-md",
                         "source": "\n\n".join(m if isinstance(m, str) else "".join(m) for m in md)}
                if c["source"]: cells.append(dict(c, outputs=[]))     # the code, then what it displays
                c = as_md
        elif not c["source"].strip(): continue
        cells.append(c)
    return dict(nb, cells=cells)


def _norm(o: dict) -> dict:
    "An output in strict nbformat 4 (pandoc's reader refuses missing fields); show_doc outputs lack some."
    o = dict(o)
    data = o.get("data", {})
    if "text/plain" in data and {"text/markdown", "text/html", "image/png", "image/svg+xml"} & set(data):
        o["data"] = {k: v for k, v in data.items() if k != "text/plain"}   # let pandoc render the rich form
    if o.get("output_type") in (None, "display_data", "execute_result"):   # pandoc wants an int execution_count:
        o["output_type"] = "display_data"; o.setdefault("metadata", {})    # show a result as displayed data
        o.pop("execution_count", None)
    return o


def page_name(nb: Path) -> str:
    """nbdev's page name, the one its symbol links (`moe_lit/_modidx.py`) point to: the notebook stem without its
    number prefix, letter suffix included (`06_kernels.batched` -> `kernels.batched`, `09a_kernels.quant` -> `kernels.quant`)."""
    return "index" if nb.stem == "index" else re.sub(r"^\d+[a-zA-Z0-9]*_", "", nb.stem.lower())


def sidebar(pages: list) -> str:
    items = "\n".join(f'<li><a href="{p}.html">{html.escape(t)}</a></li>' for p, t in pages)
    return f'<nav id="sidebar"><p><a href="index.html"><b>moe-lit</b></a></p><ol>{items}</ol></nav>'


CSS = """body{font-family:system-ui,sans-serif;margin:0;display:flex} #sidebar{width:230px;padding:1em;
background:#f4f6f8;min-height:100vh;position:sticky;top:0;font-size:14px} #sidebar ol{padding-left:1.2em}
main{padding:1em 2em;max-width:1000px;overflow-x:auto} pre{background:#f8f8f8;padding:.6em;overflow-x:auto}
img{max-width:100%} table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:2px 6px}"""
CHECK = """<script>window.addEventListener('load',()=>{const bad=[...document.images].filter(i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.src);
document.body.setAttribute('data-img-check',bad.length?'broken '+bad.join(' '):'ok '+document.images.length);});</script>"""


def render(proc_nb: Path, title: str, nav: str, description: str = ""):
    import pypandoc
    nb = clean_for_pandoc(json.loads(proc_nb.read_text()))
    tmp = DOCS / f".{proc_nb.stem}.ipynb"
    tmp.write_text(json.dumps(nb))
    name = page_name(proc_nb)
    media = DOCS / "media" / name
    (DOCS / ".before.html").write_text(nav + f'<main><h1 class="title">{html.escape(title)}</h1>'
                                       f'<p class="subtitle"><i>{html.escape(description)}</i></p>')
    (DOCS / ".after.html").write_text("</main>" + CHECK)
    (DOCS / "style.css").write_text(CSS)
    pypandoc.convert_file(str(tmp), "html5", format="ipynb", outputfile=str(DOCS / f"{name}.html"),
                          extra_args=["--standalone", "--mathml", f"--extract-media={media.relative_to(DOCS)}",
                                      "--metadata", f"pagetitle={title}", "--css=style.css",
                                      f"--include-before-body={DOCS / '.before.html'}",
                                      f"--include-after-body={DOCS / '.after.html'}"], cworkdir=str(DOCS))
    tmp.unlink()
    out = DOCS / f"{name}.html"                                    # drop the empty code blocks of echo: false cells
    out.write_text(re.sub(r'<pre class="python"><code></code></pre>|<pre><code></code></pre>', "", out.read_text()))


def front_matter(nb: Path) -> dict:
    "nbdev moves a notebook's H1 and subtitle into a raw YAML front-matter cell (title, description)."
    import yaml
    for c in json.loads(nb.read_text())["cells"]:
        src = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
        if c["cell_type"] == "raw" and src.lstrip().startswith("---"):
            return yaml.safe_load(src.strip().strip("-")) or {}
    return {}


def main():
    subprocess.run([sys.executable, str(ROOT / ".ci" / "regen.py")], check=True)
    os.environ.setdefault("TRITON_INTERPRET", "1") if not _has_cuda() else None
    os.environ["MPLBACKEND"] = "Agg"
    nbs = sorted(NBS.glob("*.ipynb"), key=lambda p: (p.stem != "index", p.stem))
    t0 = time.perf_counter()
    # one notebook per worker process at a time, a worker per core up to 4 (each imports torch once, runs its share);
    # a failing cell fails the build. Longest first: the slowest chapters do not end up last on one core.
    order = sorted(nbs, key=lambda p: -p.stat().st_size)
    # spawn, not fork: the parent asked torch about CUDA, after which a forked child cannot initialise it
    with ProcessPoolExecutor(max_workers=min(len(order), 4, len(os.sched_getaffinity(0))),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        for nb, _ in zip(order, pool.map(execute, order)): print("executed", nb.name, flush=True)
    print(f"executed {len(nbs)} notebooks in {time.perf_counter() - t0:.0f} s", flush=True)
    os.chdir(ROOT)
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    refresh_quarto_yml(); nbdev_sidebar(force=True)
    shutil.rmtree(PROC, ignore_errors=True)
    proc_nbs(n_workers=1, force=True)
    shutil.rmtree(DOCS, ignore_errors=True); DOCS.mkdir()
    procs = [PROC / nb.name for nb in nbs]
    meta = [front_matter(p) for p in procs]
    pages = [(page_name(p), m.get("title", p.stem)) for p, m in zip(procs, meta)]
    nav = sidebar(pages)
    for p, (name, title), m in zip(procs, pages, meta):
        print("rendering", name, flush=True)
        render(p, title, nav, m.get("description", ""))
    for f in DOCS.glob(".*.html"): f.unlink()
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"site: {DOCS / 'index.html'} ({len(pages)} pages)")


def _has_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError: return False


if __name__ == "__main__":
    main()
