"""Which backend exports a device array, and which one opens a descriptor."""

from __future__ import annotations

import sys

from ..._errors import CudaUnavailableError
from ._cupy import CupyCudaBackend
from ._device import CudaBackend
from ._pyarrow import PyarrowCudaBackend, pyarrow_cuda
from ._standin import StandInArray, standin
from ._torch import TorchCudaBackend


def is_device_array(x: object) -> bool:
    """True for what the CUDA transport encodes: torch CUDA tensors, cupy arrays, stand-ins.

    Checked without importing any framework that is not already imported.
    """
    if isinstance(x, StandInArray):
        return True
    if sys.modules.get("torch") is not None and isinstance(x, sys.modules["torch"].Tensor):
        return x.device.type == "cuda"
    if sys.modules.get("cupy") is not None and isinstance(x, sys.modules["cupy"].ndarray):
        return True
    return _is_cuda_buffer(x)


def _is_cuda_buffer(x: object) -> bool:
    module = sys.modules.get("pyarrow.cuda")
    return module is not None and isinstance(x, module.CudaBuffer)


def backend_for_array(x: object) -> CudaBackend:
    """The backend that exports ``x``."""
    if isinstance(x, StandInArray):
        return standin()
    if _is_cuda_buffer(x):
        return PyarrowCudaBackend()
    if sys.modules.get("torch") is not None and isinstance(x, sys.modules["torch"].Tensor):
        return TorchCudaBackend()
    return CupyCudaBackend()


def backend_for_receiver(name: str, framework: str) -> CudaBackend:
    """The backend that opens a descriptor written by backend ``name`` for ``framework``.

    A ``pyarrow.cuda`` message is rebuilt as a ``CudaBuffer`` where pyarrow has CUDA, else
    as a 1-D uint8 torch tensor of the same bytes.
    """
    if name == "standin":
        return standin()
    try:
        if framework == "pyarrow.cuda" and pyarrow_cuda() is not None:
            return PyarrowCudaBackend()
        if framework == "cupy":
            return CupyCudaBackend()
        return TorchCudaBackend()
    except ImportError as exc:
        raise CudaUnavailableError(
            f"this message holds CUDA memory ({framework}) but {exc.name} is not installed "
            f"here; send through the host path (ARROW_TENSOR_TRANSPORT=host on the producer)"
        ) from exc
