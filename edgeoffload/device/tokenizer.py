"""A light text tokenizer for the device: a Hugging Face tokenizer folder without transformers.

:class:`TextTokenizer` reads what ``PreTrainedTokenizerFast.save_pretrained`` writes
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``chat_template.jinja``) plus the model's ``generation_config.json`` and ``config.json`` for the
end-of-sequence ids, and reproduces what transformers does with them for generation:

- :meth:`TextTokenizer.encode` runs the ``tokenizers`` pipeline (its post-processor adds the
  specials it is configured to add) and prepends the bos token when ``add_bos_token`` is true
  and the post-processor does not already add it (likewise eos for ``add_eos_token``). Any
  truncation or padding stored in ``tokenizer.json`` is switched off, as transformers does by
  default: a prompt must never be cut silently.
- :meth:`TextTokenizer.decode` applies ``clean_up_tokenization_spaces`` when the config asks.
- :meth:`TextTokenizer.apply_chat_template` renders the template in the same jinja2 sandbox as
  transformers 4.57 (``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)``,
  ``loopcontrols``, the ``{% generation %}`` tag, a ``tojson`` that does not escape HTML, and
  the ``raise_exception`` / ``strftime_now`` globals) with the same variables, so the prompt
  text is identical.

:class:`StreamDecoder` turns generated ids into text pieces for streaming.

Device-path module: it imports ``tokenizers`` (no torch, no transformers); jinja2 is imported
the first time a chat template is rendered.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from edgeoffload.errors import TokenizerError, UsageError

__all__ = ["StreamDecoder", "TextTokenizer"]

log = logging.getLogger("edgeoffload.device.tokenizer")

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"

# The special-token attributes transformers passes to chat templates (its
# SPECIAL_TOKENS_ATTRIBUTES), in its order.
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_ADDITIONAL_SPECIAL_TOKENS = "additional_special_tokens"

# transformers' clean_up_tokenization, applied in this order with str.replace.
_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)

CLEANUP_HOLD_BACK = sum(len(old) - 1 for old, _ in _CLEANUP_REPLACEMENTS)
"""Characters :class:`StreamDecoder` holds back when the tokenizer cleans up spaces.

Appending text to ``raw`` can change the result of one leftmost, non-overlapping
``str.replace(old, new)`` only from ``len(old) - 1`` characters before the old end on, and the
replacements only shorten text; so over the chain, ``cleanup(raw)`` and ``cleanup(raw + more)``
agree except on the last ``sum(len(old) - 1)`` characters of ``cleanup(raw)``.
"""

_REPLACEMENT_CHAR = "\ufffd"

_FOLDER_HINT = (
    "pass a Hugging Face tokenizer folder (what tokenizer.save_pretrained() writes: "
    "tokenizer.json and tokenizer_config.json)"
)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the space before punctuation/contractions."""
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path} is missing", hint=_FOLDER_HINT)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(
            f"{path} is not readable JSON: {exc}",
            hint="the file is corrupt or truncated; copy the tokenizer folder again",
        ) from exc
    if not isinstance(data, dict):
        raise TokenizerError(
            f"{path} must hold a JSON object, got {type(data).__name__}", hint=_FOLDER_HINT
        )
    return data


def _token_text(value: object, where: str) -> str | None:
    """A special token as written by transformers: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"]) or None
    raise TokenizerError(
        f"{where} must be a string, an object with a 'content' string, or null; got {value!r}",
        hint=_FOLDER_HINT,
    )


def _token_ids(value: object, where: str) -> list[int]:
    """An ``eos_token_id`` entry of a model config: an id, a list of ids, or null."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise TokenizerError(
                f"{where} must be a token id or a list of token ids, got {value!r}",
                hint="fix eos_token_id in that file (a non-negative integer or a list of them)",
            )
    return list(items)


def _chat_template_from_config(config: Mapping[str, Any], where: str) -> str | None:
    """The default chat template of a tokenizer config (a string or a list of named ones)."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named: dict[str, str] = {}
        for entry in value:
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise TokenizerError(
                    f"{where}: chat_template entries must be objects with 'name' and "
                    f"'template' strings, got {entry!r}",
                    hint=_FOLDER_HINT,
                )
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise TokenizerError(
                f"{where}: chat_template names {sorted(named)} but none is 'default'",
                hint="name the template to use 'default' (transformers picks that one too)",
            )
        return named["default"]
    raise TokenizerError(
        f"{where}: chat_template must be a string or a list of named templates",
        hint=_FOLDER_HINT,
    )


def _compile_chat_template(source: str) -> Any:
    """Compile ``source`` in the jinja2 sandbox transformers 4.57 uses (its
    ``_compile_jinja_template``), so rendering gives byte-identical prompts."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers'
        assistant-token masks; rendered, it is just its body."""

        tags = {"generation"}  # noqa: RUF012 - how jinja2 extensions declare their tags

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body)
            return call.set_lineno(lineno)

        def _render(self, caller: Any) -> Any:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # jinja2's own tojson escapes <, >, & and ' for HTML; chat prompts are not HTML.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class TextTokenizer:
    """Encode, decode and chat-format text like transformers' fast tokenizer does.

    Build one with :meth:`from_dir`. Instances do not change after construction (the compiled
    chat template is cached on first use) and may be shared between threads.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        source: str = "<tokenizer>",
    ) -> None:
        """Wrap a loaded ``tokenizers.Tokenizer``; most callers want :meth:`from_dir`.

        Args:
            tokenizer: the tokenizer; its truncation and padding are switched off.
            config: the ``tokenizer_config.json`` object (special tokens, ``add_bos_token``,
                ``add_eos_token``, ``clean_up_tokenization_spaces``, ``chat_template``).
            chat_template: overrides ``config["chat_template"]``.
            extra_eos_token_ids: more ids that end generation (from the model's configs).
            source: where the tokenizer came from, for error messages.

        Raises:
            TokenizerError: the config is malformed, or names a bos/eos token that is not in
                the vocabulary.
        """
        config = dict(config or {})
        where = f"{source}/{TOKENIZER_CONFIG_FILE}"
        self._tokenizer = tokenizer
        self._source = source
        # A prompt cut to a stored max_length would silently change the answer.
        tokenizer.no_truncation()
        tokenizer.no_padding()

        self._special_tokens: dict[str, str | list[str]] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            text = _token_text(config.get(key), f"{where}: {key}")
            if text is not None:
                self._special_tokens[key] = text
        additional = config.get(_ADDITIONAL_SPECIAL_TOKENS) or []
        if not isinstance(additional, list):
            raise TokenizerError(
                f"{where}: {_ADDITIONAL_SPECIAL_TOKENS} must be a list", hint=_FOLDER_HINT
            )
        additional_texts = [
            _token_text(t, f"{where}: {_ADDITIONAL_SPECIAL_TOKENS}") for t in additional
        ]
        if any(additional_texts):
            self._special_tokens[_ADDITIONAL_SPECIAL_TOKENS] = [t for t in additional_texts if t]

        self._bos_token = self._special_token("bos_token")
        self._eos_token = self._special_token("eos_token")
        self._bos_token_id = self._required_id(self._bos_token, "bos_token", where)
        self._eos_token_id = self._required_id(self._eos_token, "eos_token", where)

        flags: dict[str, bool] = {}
        for key, default in (
            ("add_bos_token", False),
            ("add_eos_token", False),
            ("clean_up_tokenization_spaces", False),
        ):
            value = config.get(key, default)
            if value is None:
                value = default
            if not isinstance(value, bool):
                raise TokenizerError(
                    f"{where}: {key} must be true or false, got {value!r}", hint=_FOLDER_HINT
                )
            flags[key] = value
        self._clean_up_spaces = flags["clean_up_tokenization_spaces"]

        for key, token_id in (("bos", self._bos_token_id), ("eos", self._eos_token_id)):
            if flags[f"add_{key}_token"] and token_id is None:
                raise TokenizerError(
                    f"{where}: add_{key}_token is true but no {key}_token is set",
                    hint=f"set {key}_token in {TOKENIZER_CONFIG_FILE} or add_{key}_token: false",
                )
        # What the post-processor adds around an empty text is exactly its own specials; add
        # bos/eos ourselves only where it does not, so that they never appear twice.
        around = tokenizer.encode("", add_special_tokens=True).ids
        self._prefix_ids: list[int] = []
        self._suffix_ids: list[int] = []
        if (
            flags["add_bos_token"]
            and self._bos_token_id is not None
            and around[:1] != [self._bos_token_id]
        ):
            self._prefix_ids = [self._bos_token_id]
        if (
            flags["add_eos_token"]
            and self._eos_token_id is not None
            and around[-1:] != [self._eos_token_id]
        ):
            self._suffix_ids = [self._eos_token_id]

        eos_ids = set(extra_eos_token_ids)
        if self._eos_token_id is not None:
            eos_ids.add(self._eos_token_id)
        self._eos_token_ids = frozenset(eos_ids)

        self._chat_template = (
            chat_template
            if chat_template is not None
            else _chat_template_from_config(config, where)
        )
        self._compiled_template: Any = None

    def _special_token(self, key: str) -> str | None:
        value = self._special_tokens.get(key)
        return value if isinstance(value, str) else None

    def _required_id(self, token: str | None, key: str, where: str) -> int | None:
        if token is None:
            return None
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{where}: {key} {token!r} is not in the vocabulary of {TOKENIZER_FILE}",
                hint=f"set {key} to a token that {TOKENIZER_FILE} knows (or null)",
            )
        return int(token_id)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Load a Hugging Face tokenizer folder (and the model configs next to it, if any).

        ``tokenizer.json`` is required; ``tokenizer_config.json``, ``special_tokens_map.json``
        (fills special tokens the config does not set), ``chat_template.jinja`` (wins over the
        config's template, as in transformers), ``generation_config.json`` and ``config.json``
        (their ``eos_token_id``, an id or a list) are optional.

        Raises:
            TokenizerError: the folder or ``tokenizer.json`` is missing, or a file is corrupt or
                inconsistent; the hint says what to fix.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist", hint=_FOLDER_HINT)
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file} is missing", hint=_FOLDER_HINT)
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust binding raises bare Exception on bad JSON
            raise TokenizerError(
                f"{tokenizer_file} is not a valid tokenizers file: {exc}",
                hint="the file is corrupt, truncated or from an incompatible tokenizers "
                "version; copy or re-save the tokenizer",
            ) from exc

        config = _read_json(folder / TOKENIZER_CONFIG_FILE, required=False) or {}
        special_map = _read_json(folder / SPECIAL_TOKENS_MAP_FILE, required=False) or {}
        for key in (*_SPECIAL_TOKEN_KEYS, _ADDITIONAL_SPECIAL_TOKENS):
            if config.get(key) is None and special_map.get(key) is not None:
                config[key] = special_map[key]

        chat_template: str | None = None
        template_file = folder / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            try:
                chat_template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(
                    f"{template_file} is not readable UTF-8 text: {exc}", hint=_FOLDER_HINT
                ) from exc

        extra_eos: list[int] = []
        for name in (GENERATION_CONFIG_FILE, MODEL_CONFIG_FILE):
            model_config = _read_json(folder / name, required=False)
            if model_config is not None:
                extra_eos += _token_ids(model_config.get("eos_token_id"), f"{folder / name}")

        return cls(
            tokenizer,
            config=config,
            chat_template=chat_template,
            extra_eos_token_ids=extra_eos,
            source=str(folder),
        )

    # --- vocabulary -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows, added tokens included (``len(tokenizer)``).

        The model's logits may be wider (embedding tables are often padded); ids beyond this
        decode to nothing.
        """
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_token_id(self) -> int | None:
        """Id of the tokenizer's bos token, or None when it has none."""
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's eos token and the ``eos_token_id`` of
        ``generation_config.json`` and ``config.json``."""
        return self._eos_token_ids

    @property
    def special_tokens(self) -> dict[str, str | list[str]]:
        """The set special tokens by role (what transformers calls ``special_tokens_map``)."""
        return {
            key: list(value) if isinstance(value, list) else value
            for key, value in self._special_tokens.items()
        }

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        return self._clean_up_spaces

    def token_id(self, token: str) -> int | None:
        """Id of ``token`` (a vocabulary entry such as ``"<|im_end|>"``), or None."""
        token_id = self._tokenizer.token_to_id(token)
        return None if token_id is None else int(token_id)

    # --- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in the text become their ids.

        With ``add_special_tokens`` the post-processor's specials are added, and bos (eos) when
        ``add_bos_token`` (``add_eos_token``) is set and the post-processor does not add it.
        A chat prompt from :meth:`apply_chat_template` usually carries its own bos already:
        encode it with ``add_special_tokens=False``, as transformers does.

        Raises:
            UsageError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise UsageError(f"text to encode must be a str, got {type(text).__name__}")
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and (self._prefix_ids or self._suffix_ids):
            ids = [*self._prefix_ids, *ids, *self._suffix_ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Ids the vocabulary does not have decode to nothing, as in
        ``tokenizers``; an incomplete UTF-8 character at the end decodes to U+FFFD.

        Raises:
            UsageError: an id is not a non-negative integer.
        """
        id_list = _checked_ids(ids)
        text: str = self._tokenizer.decode(id_list, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._clean_up_spaces else text

    # --- chat -------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation into the prompt text the model was trained on.

        The template sees ``messages``, ``add_generation_prompt``, ``tools=None``,
        ``documents=None`` and every set special token (``bos_token``, ``eos_token``, ...), as
        with transformers' ``apply_chat_template(messages, tokenize=False)``.

        Raises:
            TokenizerError: there is no chat template, or it failed (a syntax error, a
                ``raise_exception`` call such as "roles must alternate", a sandbox violation).
            UsageError: ``messages`` is not a list of objects.
        """
        if self._chat_template is None:
            raise TokenizerError(
                f"{self._source} has no chat template",
                hint=f"add chat_template to {TOKENIZER_CONFIG_FILE} or a {CHAT_TEMPLATE_FILE} "
                "file, or encode plain text instead",
            )
        if isinstance(messages, str | bytes) or not all(isinstance(m, Mapping) for m in messages):
            raise UsageError(
                "messages must be a list of objects such as {'role': 'user', 'content': '...'}"
            )
        import jinja2

        try:
            if self._compiled_template is None:
                self._compiled_template = _compile_chat_template(self._chat_template)
            rendered: str = self._compiled_template.render(
                **self._special_tokens,
                messages=[dict(message) for message in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(
                f"chat template of {self._source} failed: {exc}",
                hint="check the messages (roles, order, content) against what the template expects",
            ) from exc
        return rendered


def _checked_ids(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, str | bytes):
        raise UsageError("token ids must be a sequence of integers, got a string")
    id_list: list[int] = []
    for token_id in ids:
        # numpy integers are fine (int() is exact); bools and floats are mistakes.
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise UsageError(f"token ids must be integers, got {token_id!r}")
        value = token_id.__index__()
        if value < 0:
            raise UsageError(f"token ids must be non-negative, got {value}")
        id_list.append(value)
    return id_list


class StreamDecoder:
    """Incremental detokenisation: feed generated ids, get the new text of each.

    Every :meth:`push` decodes all ids so far (``skip_special_tokens`` as given) and returns
    what was added to the text since the last piece. A piece is held back while the text ends
    with U+FFFD, the mark of a UTF-8 character whose bytes are split over tokens, so a
    character appears once complete and never as a replacement char; when the tokenizer cleans
    up tokenization spaces, the last :data:`CLEANUP_HOLD_BACK` characters are held back too,
    since a later token can still remove a space there. :meth:`flush` returns what is left.

    The pieces of all pushes plus the flush concatenate to ``tokenizer.decode(all_ids)``. That
    holds for decoders whose output for a prefix of the ids is a prefix of their output for
    all ids (byte-level BPE, SentencePiece-style Metaspace/ByteFallback); if a decoder ever
    rewrites text already emitted, a warning is logged and streaming goes on best-effort.

    Decoding all ids per push costs O(n) per token; for the lengths of a chat answer (a few
    thousand tokens) it stays far below the cost of a model step.
    """

    def __init__(self, tokenizer: TextTokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._hold = CLEANUP_HOLD_BACK if tokenizer.clean_up_tokenization_spaces else 0
        self._ids: list[int] = []
        self._emitted = ""
        self._diverged = False

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often ``""``).

        Raises:
            UsageError: ``token_id`` is not a non-negative integer.
        """
        self._ids.extend(_checked_ids([token_id]))
        text = self._decode()
        if text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._emit(text[: max(len(text) - self._hold, 0)])

    def flush(self) -> str:
        """The text not returned yet (held-back characters, a trailing incomplete character
        as U+FFFD). Pushing may go on afterwards."""
        return self._emit(self._decode())

    def _decode(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, text: str) -> str:
        if text.startswith(self._emitted):
            piece = text[len(self._emitted) :]
            self._emitted = text
            return piece
        if not self._diverged:
            self._diverged = True
            log.warning(
                "decoder rewrote text already streamed (%d ids); the stream may differ from "
                "the full decode",
                len(self._ids),
            )
        if len(text) <= len(self._emitted):
            return ""
        piece = text[len(self._emitted) :]
        self._emitted = text
        return piece
