"""GPU tests: run only where torch sees a CUDA device; otherwise one line and exit code 0.

Every test here needs a real GPU and two processes (a CUDA IPC handle cannot be opened by
the process that exported it). Without a device the whole directory is deselected at
collection, one line says why, and a run of this directory alone exits 0 instead of
pytest's "no tests collected" (5). A test can never pass without a GPU: it is not run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
_skipped: list[str] = []


def cuda_unavailable_reason() -> str | None:
    """Why this machine cannot run the GPU tests, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)"
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect every test of this directory when there is no usable GPU."""
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    if not ours:
        return
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    items[:] = [item for item in items if item not in ours]
    config.hook.pytest_deselected(items=ours)
    _skipped.append(f"tests/gpu: {len(ours)} GPU tests skipped: {reason}")


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    """The one line saying the GPU tests were skipped and why."""
    return list(_skipped)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Only GPU tests were asked for and none can run here: that is a success, not an error."""
    if _skipped and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
