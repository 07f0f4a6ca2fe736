"""Pure, deterministic building blocks: tensor codec, Noise, sampling, presets, cost models.

Nothing here does I/O or reads a clock; everything imports only the top-level modules
(``errors``, ``types``, ``keys``). Import names from their modules.
"""
