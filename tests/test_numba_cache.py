"""numba's on-disk cache follows the maths: an edit of refbn/reference.py reaches the compiled
kernels even when their cache is warm (numba itself checks only the kernel file's stamp)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import refbn
from refbn.testing import assert_close

SCRIPT = r"""
import sys
# the copy on PYTHONPATH, not an editable install's finder (which would run the source tree)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
import json, numpy as np, refbn
from refbn.backends import numba_kernels as nk
x = (np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5) % 7).astype(np.float32)
r = refbn.raw_ops.FusedBatchNormV3(x, np.full(5, 2.0, np.float32), np.full(5, 0.5, np.float32), [], [],
                                   epsilon=0.25, backend="numba")
d = nk.OPS["training", "last", "s"]
print(json.dumps({"file": refbn.__file__, "y": r.y.astype(float).tolist(),
                  "hits": sum(d.stats.cache_hits.values()), "misses": sum(d.stats.cache_misses.values())}))
"""

# inv_std as a student might mistype it: epsilon outside the square root
MUTATION = ("return 1.0 / np.sqrt(variance + epsilon)", "return 1.0 / (np.sqrt(variance) + epsilon)")


def _run(pkg, cache):
    env = dict(os.environ, PYTHONPATH=str(pkg), NUMBA_CACHE_DIR=str(cache))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                       cwd=pkg)   # not the source tree: python -c puts the working directory first
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_an_edit_of_the_maths_reaches_a_warm_numba_cache(tmp_path):
    pkg, cache = tmp_path / "pkg", tmp_path / "cache"
    shutil.copytree(Path(refbn.__file__).parent, pkg / "refbn", ignore=shutil.ignore_patterns("__pycache__"))
    cold = _run(pkg, cache)
    assert Path(cold["file"]).is_relative_to(pkg)          # the copy runs, not the installed refbn
    warm = _run(pkg, cache)
    assert warm["hits"] > 0 and warm["misses"] == 0 and warm["y"] == cold["y"]   # loaded from the cache

    ref_file = pkg / "refbn" / "reference.py"
    text = ref_file.read_text()
    assert text.count(MUTATION[0]) == 1
    ref_file.write_text(text.replace(*MUTATION))
    edited = _run(pkg, cache)
    assert edited["misses"] > 0 and edited["hits"] == 0    # the stale entry was not used

    x = (np.arange(120, dtype=np.float64).reshape(2, 3, 4, 5) % 7).astype(np.float32).astype(np.float64)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    for got, istd in ((cold, 1.0 / np.sqrt(var + 0.25)), (edited, 1.0 / (np.sqrt(var) + 0.25))):
        assert_close(np.array(got["y"], np.float32), (x - mean) * 2.0 * istd + 0.5, "y", np.float32, "numba")
    assert cold["y"] != edited["y"]
