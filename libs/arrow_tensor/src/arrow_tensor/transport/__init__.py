"""The transport room: the only code that touches a dora node.

``_facts`` reads what each output's routes allow, once (Note [Output facts]); ``_decide``
is the one decision of how a value travels, a pure function (Note [Choosing a
transport]); ``_send`` prepares a value, takes the decision and runs the executors that
send or decline, with the fast path as the decision's memoized result; ``_chunks`` splits
and reassembles values past dora's message cap; ``_messages`` holds ``encode``,
``decode`` and the ``Receiver``, with the one table from message kind to decoder;
``_metadata`` checks user keys; ``_advice`` says once what a node should change.
See ARCHITECTURE.md.
"""
