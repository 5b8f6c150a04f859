"""Repository-wide test configuration: hypothesis profiles sized for a 2-core CI machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# "dev" explores more; "ci" (the default) is derandomized so a red build is reproducible.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def run_dora() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_dora(dataflow, env=..., cwd=..., timeout=...)``: the real ``dora run``, finished.

    dora starts python nodes with the ``python`` on ``PATH``, so this interpreter's bin
    folder goes first; ``env`` entries are added to this process's environment.
    """

    def run(
        dataflow: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 240,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        dora = shutil.which("dora", path=full_env["PATH"])
        assert dora is not None, f"no dora CLI next to {sys.executable}: run `make install`"
        return subprocess.run(
            [dora, "run", str(dataflow)],
            env=full_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
