"""The kernels directory installs as tgo_fast.kernels and never as a top-level `kernels` module.

transformers probes `importlib.util.find_spec("kernels")` for the Hugging Face kernels hub package; a
top-level `kernels` from this project would shadow it.
"""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, pathlib
import tgo_fast.kernels, tgo_fast.models, tgo_fast.trainer
print(pathlib.Path(tgo_fast.kernels.__file__).resolve().parent)
spec = importlib.util.find_spec("kernels")
print(None if spec is None else pathlib.Path(spec.origin or list(spec.submodule_search_locations)[0]).resolve())
"""


def test_kernels_is_a_subpackage_only(tmp_path):
    # Run outside the checkout so the current directory is not on sys.path.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_dir, top_level = out.stdout.split()[:2]
    assert Path(kernels_dir) == REPO / "kernels"
    # transformers >= 5.25 installs the hub's own `kernels` package; whatever `kernels` resolves to, it is not ours.
    assert top_level == "None" or REPO / "kernels" not in (Path(top_level), *Path(top_level).parents), top_level
