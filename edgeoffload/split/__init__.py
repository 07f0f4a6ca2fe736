"""Everything that needs onnx (``pip install 'edgeoffload[split]'``): model loading, cut
analysis, profiling, splitting and verification, decoder splits, the embedded zoo; and
``ort_export`` (``export-ort``), which needs only onnxruntime and runs on a device install.

Used by the CLI and the lab; never by ``device`` or ``edge``. Import names from their modules.
"""
