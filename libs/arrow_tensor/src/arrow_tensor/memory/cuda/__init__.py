"""CUDA tensors as IPC descriptors: the payload never leaves the GPU (see SPEC.md).

The CUDA part of the memory room: ``_device`` is the narrow interface to device memory and
its backends (``_torch``, ``_cupy``, ``_pyarrow``, ``_runtime``, the CPU ``_standin``;
``_select`` picks one), ``_descriptor`` the message, ``_ipc`` the producer, ``_receive`` the
receiver, ``_handles`` the opened allocations of this process.

Note [CUDA IPC descriptors]
A CUDA IPC handle names a whole allocation, not a tensor: a caching allocator packs many
tensors into one ``cudaMalloc`` block, and opening the handle returns the block's base. So a
message carries (1) the tensor header (``_schema.TensorHeader``: dtype, shape, dimension
order; the bytes are the dense C-ordered array of the permuted shape, exactly as inline),
(2) the 64-byte ``cudaIpcMemHandle_t`` of the block and a 64-byte ``cudaIpcEventHandle_t``
as the Arrow array (128 bytes of uint8: no payload bytes), and (3) in the metadata the byte
offset of the tensor inside the block, the block's size, the device (UUID and PCI bus id,
because ``CUDA_VISIBLE_DEVICES`` may number devices differently per process), and where the
lifetime is tracked (control block name, slot, generation, seq). Forgetting the offset is
dora-rs/dora#978: ``torch.stack`` of two small tensors lands at a non-zero offset of a
shared block, and a receiver that reads from the base gets someone else's bytes.

Producer. A dense tensor (contiguous or a permutation of contiguous) is shared as it is; any
other layout is compacted once, on the device, into a tensor only the transport references.
The producer keeps a reference to what it shared in a bounded table of in-flight slots: the
slot/lifetime machinery of ``_slots`` (one design for host pools and CUDA buffers), over a
control block in an owner-only /dev/shm file named like the host pools'
(``at-<dataflow>-<pid>-<random>``), so the same orphan sweep removes it. A slot is reused
only when every receiver released it, is dead, or provably never got it (lease or overtake,
see Note [Lifetimes without atomic read-modify-write]); then the reference is dropped and
the allocator may reuse the memory. No free slot within ``wait_s``: ``PoolExhaustedError``,
which the transport turns into the host path for that message (logged once per output).

Receiver. Each handle is opened once per process (``HandleCache``) and closed after the last
tensor built on it is freed: tensors are built over an owner object that torch / cupy / numpy
keep referenced from every view, and a finalizer on that owner (1) synchronizes this
process's stream, so no kernel of ours still reads, (2) drops the handle's reference count,
closing it at zero, (3) releases the slot to the producer. Before a tensor is built the
current stream waits on the producer's interprocess event, so no kernel reads before the
producer's kernels are done. A descriptor whose producer process is gone raises
``StaleHandleError``. Tensors built before the crash must not be read any more: CUDA leaves
access to memory whose exporter freed it undefined (a crash frees everything). Receivers
that keep data longer than a message's life should take a private copy (``writable=True``);
a producer that exits cleanly first waits (``ARROW_TENSOR_CUDA_LINGER``) for receivers.

Received tensors are read-only by contract: the whole block is visible to the receiver and
the producer may hand the memory to its allocator again once every receiver released it.
Use ``decode(..., writable=True)`` for a private copy on the device.
"""
