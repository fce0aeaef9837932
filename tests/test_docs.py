"mgab-docs renders every notebook, and names the one that does not render."
import json
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
    # a notebook whose stored output is malformed does not render: the build names it
    nb = json.loads((proj / "nbs" / "00_core.ipynb").read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code" and "check_shape(\"m\"" in "".join(c["source"]))
    code["outputs"] = [{"output_type": "display_data", "data": {"image/png": 42}, "metadata": {}}]
    (proj / "nbs" / "00_core.ipynb").write_text(json.dumps(nb))
    with pytest.raises(RuntimeError, match="00_core|core"):
        build_docs(proj, "site", execute=False)
