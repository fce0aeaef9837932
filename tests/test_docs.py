"mgab-docs renders every notebook, and names the one that does not render."
import json
import re
import shutil
from pathlib import Path
import pytest
from mgab.docs import build_docs

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "pyproject.toml", proj)
    (proj / "mgab").mkdir()
    (proj / "mgab" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    (proj / "nbs").mkdir()
    for n in ("00_core.ipynb", "index.ipynb"): shutil.copy(ROOT / "nbs" / n, proj / "nbs" / n)
    return proj


def test_docs_build_and_failure(tmp_path):
    proj = _project(tmp_path)
    pages = build_docs(proj, "site", execute=False)
    names = sorted(p.name for p in pages)
    assert names == ["core.html", "index.html"]
    page = (proj / "site" / "core.html").read_text()
    assert "check_shape" in page and 'href="index.html"' in page and "{target=" not in page
    # navigation: home first, the current page marked, a search box over a client-side index
    nav = re.search(r'<nav id="mgab-nav">.*?</nav>', page, re.S)[0]
    assert nav.index('href="index.html"') < nav.index('href="core.html"')
    assert '<li class=current><a href="core.html">' in nav and 'id="mgab-search"' in nav
    assert '<script src="search.js"></script>' in page
    index = json.loads((proj / "site" / "search.js").read_text().split("window.MGAB_INDEX = ", 1)[1].split(";\n")[0])
    assert [p["url"] for p in index] == ["index.html", "core.html"] and "check_shape" in index[1]["text"]
    # a notebook whose stored output is malformed does not render: the build names it
    nb = json.loads((proj / "nbs" / "00_core.ipynb").read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code" and "check_shape(\"m\"" in "".join(c["source"]))
    code["outputs"] = [{"output_type": "display_data", "data": {"image/png": 42}, "metadata": {}}]
    (proj / "nbs" / "00_core.ipynb").write_text(json.dumps(nb))
    with pytest.raises(RuntimeError, match="00_core|core"):
        build_docs(proj, "site", execute=False)


def test_docs_entry_point_executes_and_caches(tmp_path):
    "The installed `mgab-docs`, without the venv on PATH, runs the notebooks once; their outputs are cached"
    import os, subprocess, sys
    import nbformat
    from mgab.docs import execute_cached
    exe = Path(sys.executable).parent / "mgab-docs"
    if not exe.is_file(): pytest.skip(f"no mgab-docs next to {sys.executable}")
    proj = _project(tmp_path)
    for name, title, code in (("index", "mgab", "print('home')"), ("00_core", "Core", "6 * 7")):  # small, quick
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {title}\n\n> check_shape {title}"),
                                             nbformat.v4.new_code_cell(code)])
        nbformat.write(nb, proj / "nbs" / f"{name}.ipynb")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | dict(PATH="/usr/bin:/bin")
    r = subprocess.run([str(exe), "--root", str(proj), "--out", "site"], env=env, capture_output=True, text=True,
                       cwd=proj)  # nbdev is found next to sys.executable, not on PATH
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 run, 0 from the cache" in r.stdout
    assert ">42<" in (proj / "site" / "core.html").read_text()  # the output of the executed notebook
    cached = sorted((proj / "site" / ".cache").glob("*.ipynb"))
    assert [p.name.split("-")[0] for p in cached] == ["00_core", "index"]
    # nothing changed: a rebuild takes both from the cache and runs nothing
    work = tmp_path / "work"; shutil.copytree(proj, work)
    assert execute_cached(work, proj / "site" / ".cache") == {"00_core.ipynb": "cached", "index.ipynb": "cached"}
    assert "42" in (work / "nbs" / "00_core.ipynb").read_text()
