"""``import arrow_tensor`` needs only numpy and pyarrow; torch is imported lazily, if at all."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_BLOCKERS = {
    # torch installed but unimportable, the way test suites and slim images block it.
    "sys_modules_none": "sys.modules['torch'] = None",
    # torch absent: every import of it fails like a missing package.
    "meta_path_finder": """
        import importlib.abc
        class _NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, _NoTorch())
    """,
}

_BODY = """
import numpy as np
import arrow_tensor as at

x = np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1)
array, meta = at.encode(x, checksum=True)
y = at.decode(array, meta, verify=True)
assert type(y) is np.ndarray and y.strides == x.strides and (y == x).all()
assert meta["at.version"] == 2 and meta["at.kind"] == "tensor"
assert meta["at.tensor"] == "numpy;float32;4,2,3;1,2,0"

# A message a torch sender wrote: same bytes, framework "torch".
for dtype in ("float32", "bfloat16"):
    torch_meta = {**meta, "at.tensor": "torch;float32;4,2,3;1,2,0"}
    if dtype == "bfloat16":
        torch_meta["at.tensor"] = "torch;bfloat16;4,2,3,2;0,1,2,3"
        torch_meta.pop("at.checksum")
    try:
        at.decode(array, torch_meta)
    except at.UnsupportedTensorError as exc:
        assert "torch is not installed" in str(exc), exc
    else:
        raise AssertionError("decoding a torch message without torch must fail")

assert "torch" not in sys.modules or sys.modules["torch"] is None, "torch was imported"
print("OK")
"""


def _run(prelude: str) -> subprocess.CompletedProcess[str]:
    code = "import sys\n" + textwrap.dedent(prelude) + "\n" + _BODY
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("blocker", list(_BLOCKERS))
def test_works_without_torch(blocker: str) -> None:
    result = _run(_BLOCKERS[blocker])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_import_does_not_import_torch_even_if_installed() -> None:
    code = """
import sys
import numpy as np
import arrow_tensor as at
at.decode(*at.encode(np.zeros((2, 3), np.int8)))
assert "torch" not in sys.modules, "import arrow_tensor pulled in torch"
print("OK")
"""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"
