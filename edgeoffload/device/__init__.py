"""What a phone ships: the head runtime, the asyncio and blocking clients, split generation and
the tokenizer.

Imports ``protocol``, ``core`` and the top level only (never ``edge``, ``split`` or ``lab``), and
nothing of onnx, torch, transformers or optimum. Import names from their modules.
"""
