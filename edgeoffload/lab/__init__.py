"""Measuring: device and link emulation, the demo, benchmarks, the load test and the scenario
runner, over one harness (keys, server processes) and one stats module.

Every benchmark returns a typed, frozen result with ``to_dict()``. Import names from their
modules.
"""
