"""Everything that needs onnx (``pip install 'edgeoffload[split]'``): model loading, cut
analysis, profiling, splitting and verification, decoder splits, the embedded zoo.

Used by the CLI and the lab; never by ``device`` or ``edge``. Import names from their modules.
"""
