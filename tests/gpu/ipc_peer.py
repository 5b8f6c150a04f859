"""The receiving process of the two-process CUDA IPC checks that need no dora.

A CUDA IPC handle cannot be opened by the process that exported it, so the producer (a
test, or ``smoke.py``) starts this script and talks to it in JSON lines: one request per
line on stdin, one answer per line on stdout.

Requests (``op``):

- ``decode``: ``array`` (hex of the message's bytes) or ``array_file`` (a file holding
  them), ``meta``, optional ``device``,
  ``writable``, ``verify``, ``hold`` (keep the value until ``release``), ``sync``
  (synchronize the device before answering) and ``expect`` (``digest`` of the producer's
  tensor, see ``digest``; without it nothing is compared). Answers ``ok``, ``kind``
  (``torch`` / ``cupy`` / ``numpy``), ``device``, ``strides`` and the error, if any.
- ``resend``: encode the held value again (memory received from another process must be
  copied first) and answer its message, for the producer to decode.
- ``write``: try an in-place write into the held value (answers ``wrote``).
- ``release``: drop every held value; ``stats``: handles and references still open.
- ``quit``.

It runs as well on the host stand-in (``BACKEND=standin``), so its logic is tested on CPU.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import numpy as np
import pyarrow as pa


def host_array(value: Any) -> np.ndarray:
    """The values of a decoded tensor as a host numpy array of the same bits (C order)."""
    module = type(value).__module__.split(".")[0]
    if module == "torch":
        import torch

        bits = value.detach().cpu().contiguous()
        try:
            return bits.numpy()
        except TypeError:  # bfloat16, float8, complex32: the same bits as integers
            width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
            return bits.view(width[bits.element_size()]).numpy()
    if module == "cupy":
        return value.get()
    return np.ascontiguousarray(value)


def digest(value: Any) -> str:
    """dtype, shape and the xxh3-64 of the C-ordered bytes: equal for equal tensors."""
    import xxhash

    host = host_array(value)
    shape = ",".join(map(str, host.shape))
    return f"{host.dtype.str};{shape};{xxhash.xxh3_64(host.tobytes()).hexdigest()}"


def _kind(value: Any) -> str:
    return type(value).__module__.split(".")[0]


def _device(value: Any) -> str:
    device = getattr(value, "device", None)
    if device is None:
        return "cpu"
    return str(getattr(device, "id", device))


def _strides(value: Any) -> list[int]:
    stride = getattr(value, "stride", None)
    if callable(stride):
        return list(stride())
    itemsize = value.dtype.itemsize
    return [s // itemsize for s in value.strides]


def main() -> None:
    import arrow_tensor as at
    from arrow_tensor.memory.cuda import _handles

    held: list[Any] = []
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        answer: dict[str, Any] = {"op": op}
        try:
            if op == "decode":
                if "array_file" in request:  # big message bytes come as a file
                    data = np.fromfile(request["array_file"], dtype=np.uint8)
                else:
                    data = np.frombuffer(bytes.fromhex(request["array"]), np.uint8)
                array = pa.array(data)
                value = at.decode(
                    array,
                    request["meta"],
                    writable=request.get("writable", False),
                    verify=request.get("verify", False),
                    device=request.get("device"),
                )
                if request.get("sync") and _kind(value) == "torch" and value.is_cuda:
                    import torch

                    torch.cuda.synchronize(value.device)
                answer.update(kind=_kind(value), device=_device(value), strides=_strides(value))
                if request.get("expect") is not None:
                    answer["digest"] = digest(value)
                answer["ok"] = request.get("expect") in (None, answer.get("digest"))
                if request.get("hold"):
                    held.append(value)
                del value
            elif op == "resend":
                array, meta = at.encode(held[-1])
                answer.update(array=array.buffers()[1].to_pybytes().hex(), meta=meta, ok=True)
            elif op == "write":
                value = held[-1]
                try:
                    value[(0,) * value.ndim] = 1
                    answer.update(wrote=True, ok=True)
                except (RuntimeError, ValueError, TypeError) as exc:
                    answer.update(wrote=False, ok=True, error=str(exc)[:200])
                del value
            elif op == "release":
                held.clear()
                answer["ok"] = True
            elif op == "stats":
                answer.update(ok=True, handles=len(_handles.opened), refs=_handles.opened.refs())
            elif op == "quit":
                answer["ok"] = True
                print(json.dumps(answer), flush=True)
                return
            else:
                answer.update(ok=False, error=f"unknown op {op!r}")
        except Exception as exc:  # every failure is an answer, with its type
            answer.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
            answer["trace"] = traceback.format_exc()[-1500:]
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
