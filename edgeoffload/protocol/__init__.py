"""The sans-I/O wire protocol (mobile_bridge/PROTOCOL.md); import names from their modules.

``connection`` (the two connections), ``events``, ``wire`` (strict msgpack), ``tensors`` (the
tensor schema) and ``_state`` (the state rules).
"""
