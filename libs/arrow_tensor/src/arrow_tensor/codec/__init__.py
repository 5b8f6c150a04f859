"""The codec room: tensors and bytes, nothing else.

What a tensor is on the wire (``_schema``: every ``at.`` key and message kind, the header
grammar; ``_dtypes``: the one dtype table; ``_layout``: dimension orders and density), how
its bytes are found (``_tensor``: plan, encode, the one payload reader, decode and the
fast path; ``_tree``: nested structures in one buffer; ``_checksum``), how torch is spoken
to (``_torch``, imported only when torch is), and the bounded ``_memo`` type every cache
uses. This room never imports dora, never opens a file and never imports a room above it
(``make lint`` checks it). See ARCHITECTURE.md.
"""
