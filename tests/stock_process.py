"""Run a script in a fresh Python process where `fdbpl_hf` cannot be imported: what a user who
never installed us runs (stock transformers + peft)."""

import os
import subprocess
import sys

_BLOCK_FDBPL = '''
import sys

class _BlockFDBPL:
    """Refuses fdbpl_hf, so the code below proves it runs on stock libraries alone."""
    def find_spec(self, name, path=None, target=None):
        if name == "fdbpl_hf" or name.startswith("fdbpl_hf."):
            raise ImportError("fdbpl_hf is blocked in this process")
        return None

sys.meta_path.insert(0, _BlockFDBPL())
try:
    import fdbpl_hf  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the import block failed")
'''


def run_without_fdbpl_hf(script: str, timeout: int = 300, offline: bool = True) -> subprocess.CompletedProcess:
    """Run `script` with fdbpl_hf blocked; fails the test with the child's stderr, and checks
    that the child never imported fdbpl_hf. `offline=False` lets it reach the (loopback) Hub."""
    epilogue = '\nassert not any(m == "fdbpl_hf" or m.startswith("fdbpl_hf.") for m in sys.modules)\n'
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", _BLOCK_FDBPL + script + epilogue], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, f"stock process exited with {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc
