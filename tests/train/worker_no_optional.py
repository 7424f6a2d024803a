"""Run ``launch/pretrain.py`` in this process with optional packages hidden.

``python worker_no_optional.py <overrides>``: a ``sys.meta_path`` finder makes every import of
the packages in ``SFMED_HIDE`` (comma-separated top-level names) fail as if they were not
installed, then the real entry point runs. At the end it prints ``RESULT {json}`` with the
files of the sfmed modules that were loaded (what the training path imports).
"""

import importlib.abc
import json
import os
import runpy
import sys

HIDDEN = {n for n in os.environ.get("SFMED_HIDE", "").split(",") if n}


class Hide(importlib.abc.MetaPathFinder):
    """Wraps a finder so that the hidden packages (and their submodules) are not found: both
    ``import x`` and ``importlib.util.find_spec("x")`` then behave as on a machine without them."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in HIDDEN:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(fullname, path, target) if find else None

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
for name in list(sys.modules):
    if name.split(".")[0] in HIDDEN:
        del sys.modules[name]

repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
entry = os.path.join(repo, "launch", "pretrain.py")
sys.argv = [entry, *sys.argv[1:]]
try:
    runpy.run_path(entry, run_name="__main__")
except SystemExit as e:
    if e.code not in (None, 0):
        raise
files = sorted(
    m.__file__ for n, m in list(sys.modules.items()) if n.startswith("sfmed") and m.__file__
)
loaded = sorted({n.split(".")[0] for n in sys.modules})
print("RESULT " + json.dumps({"sfmed_files": files, "top_level": loaded}))
