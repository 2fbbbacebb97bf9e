"""The wheel built from this repository installs into a fresh venv and imports without transformers.

Slow (builds a wheel, creates a venv): ``pytest -m slow tests/test_packaging.py``. The fresh venv gets no
downloads: its dependencies are this interpreter's installed packages *minus transformers* (and minus
bdseal itself), exposed through a ``.pth`` file, and the wheel goes in with ``--no-deps --no-index``;
``pip check`` then verifies that those dependencies satisfy the wheel's requirements.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXCLUDED = ("transformers", "bdseal", "__editable__", "_bdseal")

CHECK = r"""
import importlib.util, pathlib, sys
assert importlib.util.find_spec("transformers") is None, "transformers should be absent"
import bdseal
assert "site-packages" in bdseal.__file__, bdseal.__file__
print("version", bdseal.__version__)
import bdseal.api, bdseal.ssl
from bdseal.defenses import list_defenses
assert {"pgbd", "pgrl", "vibe", "gssd", "nad", "ft"} <= set(list_defenses())
root = pathlib.Path(bdseal.__file__).parent
assert (root / "py.typed").exists() and (root / "conf" / "config.yaml").exists()
from bdseal.ssl.foundation import load_foundation
d = pathlib.Path(sys.argv[1]); d.mkdir(exist_ok=True); (d / "config.json").write_text("{}")
try:
    load_foundation(d)
except ImportError as e:
    assert "pip install 'bdseal[fm]'" in str(e), e
    print("fm error:", str(e).split(";")[0])
else:
    raise AssertionError("load_foundation worked without transformers")
"""


def _run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_without_transformers(tmp_path: Path) -> None:
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, REPO)
    wheel = next(dist.glob("bdseal-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "bdseal/py.typed" in names and "bdseal/conf/config.yaml" in names and "bdseal/api.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "examples/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: transformers" in meta and 'extra == "fm"' in meta.split("Requires-Dist: transformers")[1].splitlines()[0]
    assert "Requires-Dist: torch<3,>=" in meta and "License-Expression: MIT" in meta

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(EXCLUDED) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    (site / "host_deps.pth").write_text(f"{deps}\n")
    _run(py, "-m", "pip", "uninstall", "-y", "-q", "setuptools")  # ensurepip's old copy would shadow the host's
    _run(py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = _run(py, "-c", CHECK, tmp_path / "fake_fm", cwd=tmp_path, env=env).stdout
    assert "version" in out and "fm error" in out
    listed = _run(env_dir / "bin" / "bdseal", "list", cwd=tmp_path, env=env).stdout
    assert "defenses:" in listed and "pgrl" in listed
    _run(py, "-m", "pip", "check", cwd=tmp_path, env=env)
