"""edgeoffload.device.tokenizer: encode/decode, streaming, chat templates vs transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from edgeoffload.device.tokenizer import (
    CLEANUP_HOLD_BACK,
    StreamDecoder,
    TextTokenizer,
    clean_up_tokenization,
)
from edgeoffload.errors import TokenizerError, UsageError

CORPUS = [
    "The edge server runs the tail of the model while the phone runs the head.",
    "Les données traversent le réseau chiffré; éléphant, garçon, naïve, Ångström.",
    "Small devices share the work: 1, 2, 3 tokens per second, isn't it?",
    "边缘服务器 运行 模型 的 后半部分。手机 运行 前半部分。",
    "Emoji travel too: 🙂 🚀 🎉 👍🏽 and 🇫🇷.",
    "Über straße café déjà vu — “quotes” and ‘apostrophes’.",
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Multi-line, whitespace-sensitive: exercises trim_blocks/lstrip_blocks, loop controls, the
# {% generation %} tag, tojson, raise_exception and the special-token variables.
RICH_TEMPLATE = """\
{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' and not loop.first %}
        {% continue %}
    {% endif %}
<|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}
        {% generation %}
{{ message['content'] | trim }}<|im_end|>
        {% endgeneration %}
    {% else %}
{{ message['content'] }}<|im_end|>
    {% endif %}
    {% if message.get('meta') %}
{{ message['meta'] | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
{% if tools is none and documents is none %}{{ '' }}{% endif %}
{{ pad_token ~ '|' ~ eos_token }}"""

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello! ¿Qué tal? 🙂"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "  4 <b>&amp;</b>  "},
        {"role": "user", "content": "And in 中文?"},
    ],
    [
        {"role": "user", "content": "line one\n\n  line two\t"},
        {"role": "system", "content": "late system message"},
        {"role": "assistant", "content": "ok"},
    ],
    [
        {"role": "user", "content": "with meta", "meta": "<tag> & 'quote' é"},
    ],
]


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS[:1],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    tokenizer.add_special_tokens(SPECIALS[1:])
    return tokenizer


def _write_folder(folder: Path, tokenizer: Tokenizer, **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    base = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
    }
    base.update(config)
    (folder / "tokenizer_config.json").write_text(json.dumps(base), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return _train_tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, trained: Tokenizer) -> Path:
    return _write_folder(tmp_path_factory.mktemp("tok") / "chatml", trained)


@pytest.fixture(scope="module")
def tok(folder: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def cleanup_tok(tmp_path_factory: pytest.TempPathFactory, trained: Tokenizer) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "cleanup"
    return TextTokenizer.from_dir(_write_folder(path, trained, clean_up_tokenization_spaces=True))


def _transformers_fast(path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))


# --- vocabulary and special tokens ----------------------------------------------------------


def test_special_tokens_and_vocab(tok: TextTokenizer, trained: Tokenizer) -> None:
    assert tok.vocab_size == trained.get_vocab_size(with_added_tokens=True)
    im_end = trained.token_to_id("<|im_end|>")
    assert tok.token_id("<|im_end|>") == im_end
    assert tok.token_id("<|not a token|>") is None
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids == frozenset({im_end})
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.has_chat_template
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_eos_ids_union_of_configs(tmp_path: Path, trained: Tokenizer) -> None:
    folder = _write_folder(tmp_path / "t", trained)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 7, "bos_token_id": 1}))
    tok = TextTokenizer.from_dir(folder)
    assert tok.eos_token_ids == frozenset({0, 2, 5, 7, trained.token_to_id("<|im_end|>")})

    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    (folder / "config.json").unlink()
    assert TextTokenizer.from_dir(folder).eos_token_ids == frozenset(
        {trained.token_to_id("<|im_end|>")}
    )


def test_special_tokens_map_fills_gaps_and_added_token_dicts(
    tmp_path: Path, trained: Tokenizer
) -> None:
    folder = _write_folder(
        tmp_path / "t",
        trained,
        eos_token={"content": "<|im_end|>", "special": True, "__type": "AddedToken"},
        bos_token=None,
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>"})
    )
    tok = TextTokenizer.from_dir(folder)
    assert tok.eos_token == "<|im_end|>"  # the tokenizer config wins
    assert tok.bos_token == "<|im_start|>"
    assert tok.bos_token_id == trained.token_to_id("<|im_start|>")


# --- encode / decode ----------------------------------------------------------------------

TEXTS = [
    "",
    "hello world",
    "Les données traversent le réseau: éléphant, garçon, naïve.",
    "边缘服务器运行模型",
    "Emoji 🙂🚀 👍🏽 🇫🇷 and unseen ones 🦜🪐",
    "Mixed: Ωμέγα, Кириллица, עברית, العربية, हिन्दी, 日本語のテキスト",
    "  leading and trailing spaces  \n\t tabs and newlines\r\n",
    "unseen chars 漢字 ✓ ∑ ∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids  # nothing to add here


def test_special_tokens_in_text(tok: TextTokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == tok.token_id("<|im_start|>")
    assert tok.token_id("<|im_end|>") in ids
    assert tok.decode(ids) == "user\nhi\n"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_encode_matches_transformers(folder: Path, tok: TextTokenizer) -> None:
    reference = _transformers_fast(folder)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == reference.encode(text)
        ids = tok.encode(text)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids)


def test_decode_ignores_unknown_ids_and_rejects_bad_ones(tok: TextTokenizer) -> None:
    ids = tok.encode("hello")
    assert tok.decode([*ids, tok.vocab_size + 10]) == "hello"
    for bad in ([-1], [1.0], [True], "abc"):
        with pytest.raises(UsageError):
            tok.decode(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_add_bos_token(tmp_path: Path, trained: Tokenizer) -> None:
    bos = trained.token_to_id("<|endoftext|>")
    folder = _write_folder(tmp_path / "a", trained, bos_token="<|endoftext|>", add_bos_token=True)
    tok = TextTokenizer.from_dir(folder)
    assert tok.bos_token_id == bos
    plain = tok.encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == [bos, *plain]
    assert tok.encode("") == [bos]

    # A post-processor that already adds bos must not get a second one.
    with_template = Tokenizer.from_str(trained.to_str())
    with_template.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    folder = _write_folder(
        tmp_path / "b", with_template, bos_token="<|endoftext|>", add_bos_token=True
    )
    tok = TextTokenizer.from_dir(folder)
    assert tok.encode("hello") == [bos, *plain]
    assert tok.encode("hello", add_special_tokens=False) == plain

    # add_bos_token false: only what the post-processor adds.
    folder = _write_folder(
        tmp_path / "c", with_template, bos_token="<|endoftext|>", add_bos_token=False
    )
    assert TextTokenizer.from_dir(folder).encode("hello") == [bos, *plain]
    folder = _write_folder(tmp_path / "d", trained, bos_token="<|endoftext|>")
    assert TextTokenizer.from_dir(folder).encode("hello") == plain


def test_add_eos_token(tmp_path: Path, trained: Tokenizer) -> None:
    folder = _write_folder(tmp_path / "e", trained, add_eos_token=True)
    tok = TextTokenizer.from_dir(folder)
    eos = trained.token_to_id("<|im_end|>")
    assert tok.encode("hi") == [*tok.encode("hi", add_special_tokens=False), eos]


def test_stored_truncation_is_ignored(tmp_path: Path, trained: Tokenizer) -> None:
    truncating = Tokenizer.from_str(trained.to_str())
    truncating.enable_truncation(max_length=3)
    tok = TextTokenizer.from_dir(_write_folder(tmp_path / "t", truncating))
    text = "a prompt that is much longer than three tokens"
    assert tok.decode(tok.encode(text)) == text


def test_clean_up_tokenization_spaces(folder: Path, cleanup_tok: TextTokenizer) -> None:
    ids = cleanup_tok.encode("Hello , world ! it is n't , is it ?")
    assert cleanup_tok.decode(ids) == "Hello, world! it isn't, is it?"
    reference = _transformers_fast(folder)
    assert cleanup_tok.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=True)


# --- streaming ----------------------------------------------------------------------------


def _stream(tok: TextTokenizer, ids: list[int], **kwargs: Any) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert decoder.token_ids == tuple(ids)
    return pieces


def test_split_multibyte_character_is_emitted_once(tok: TextTokenizer) -> None:
    # Characters absent from the training corpus fall back to one token per UTF-8 byte.
    for char in ["漢", "🦜", "𝔘", "✓"]:
        ids = tok.encode(char)
        assert 1 < len(ids) <= len(char.encode("utf-8"))
        pieces = _stream(tok, ids)
        assert pieces == [""] * (len(ids) - 1) + [char, ""]
    pieces = _stream(tok, tok.encode("ok 🦜!"))
    assert "".join(pieces) == "ok 🦜!"
    assert all("\ufffd" not in piece for piece in pieces)


def test_truncated_character_surfaces_at_flush(tok: TextTokenizer) -> None:
    ids = tok.encode("a🦜")[:-1]  # generation stopped inside the emoji
    decoder = StreamDecoder(tok)
    assert "".join(decoder.push(i) for i in ids) == "a"
    assert decoder.flush() == tok.decode(ids)[1:]
    assert decoder.flush() == ""


def test_special_tokens_are_skipped_in_stream(tok: TextTokenizer) -> None:
    ids = tok.encode("hi<|im_end|>")
    assert "".join(_stream(tok, ids)) == "hi"
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == "hi<|im_end|>"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40))
def test_stream_concatenation_equals_decode(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    if not any(special in text for special in SPECIALS):
        assert "".join(pieces) == text
    assert all(not piece.endswith("\ufffd") for piece in pieces[:-1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 500), max_size=30))
def test_stream_of_arbitrary_ids_equals_decode(tok: TextTokenizer, ids: list[int]) -> None:
    # Arbitrary ids include invalid UTF-8 byte runs and special tokens.
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=" .?!,'ntmsvre", max_size=40))
def test_stream_with_cleanup_equals_decode(cleanup_tok: TextTokenizer, text: str) -> None:
    ids = cleanup_tok.encode(text)
    assert "".join(_stream(cleanup_tok, ids)) == cleanup_tok.decode(ids)


@settings(max_examples=300)
@given(st.text(alphabet=" .?!,'ntmsvrexy", max_size=30), st.text(alphabet=" .?!,'ntmsvre"))
def test_cleanup_hold_back_suffices(raw: str, more: str) -> None:
    before = clean_up_tokenization(raw)
    assert clean_up_tokenization(raw + more).startswith(before[: len(before) - CLEANUP_HOLD_BACK])


# --- chat templates -----------------------------------------------------------------------


def test_chatml_template(tok: TextTokenizer) -> None:
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert no_prompt + "<|im_start|>assistant\n" == prompt
    im_start = tok.token_id("<|im_start|>")
    assert im_start is not None
    assert tok.encode(prompt, add_special_tokens=False).count(im_start) == 3


@pytest.mark.parametrize("template", [CHATML, RICH_TEMPLATE], ids=["chatml", "rich"])
@pytest.mark.parametrize("as_file", [False, True], ids=["config", "jinja-file"])
def test_chat_template_matches_transformers(
    tmp_path: Path, trained: Tokenizer, template: str, as_file: bool
) -> None:
    config: dict[str, Any] = {"bos_token": "<|endoftext|>"}
    if as_file:
        config["chat_template"] = "{{ 'overridden by chat_template.jinja' }}"
    else:
        config["chat_template"] = template
    folder = _write_folder(tmp_path / "t", trained, **config)
    if as_file:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    tok = TextTokenizer.from_dir(folder)
    reference = _transformers_fast(folder)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            theirs = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours == theirs
            assert tok.encode(ours, add_special_tokens=False) == reference.encode(
                theirs, add_special_tokens=False
            )


def test_chat_template_matches_transformers_constructor(folder: Path, tok: TextTokenizer) -> None:
    """The form the brief names: PreTrainedTokenizerFast(tokenizer_file=..., ...)."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_named_chat_templates(tmp_path: Path, trained: Tokenizer) -> None:
    named = [
        {"name": "tool_use", "template": "{{ 'tools' }}"},
        {"name": "default", "template": "{{ messages[0]['content'] }}"},
    ]
    tok = TextTokenizer.from_dir(_write_folder(tmp_path / "n", trained, chat_template=named))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(TokenizerError):
        TextTokenizer.from_dir(_write_folder(tmp_path / "m", trained, chat_template=named[:1]))


def test_chat_template_errors(tmp_path: Path, trained: Tokenizer) -> None:
    tok = TextTokenizer.from_dir(
        _write_folder(tmp_path / "r", trained, chat_template=RICH_TEMPLATE)
    )
    with pytest.raises(TokenizerError, match="unknown role tool") as info:
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    assert info.value.hint

    broken = TextTokenizer.from_dir(
        _write_folder(tmp_path / "s", trained, chat_template="{% for m in messages %}")
    )
    with pytest.raises(TokenizerError):
        broken.apply_chat_template([{"role": "user", "content": "x"}])

    # The sandbox refuses attribute tricks, as it does in transformers.
    escape = "{{ messages.__class__.__mro__ }}"
    sandboxed = TextTokenizer.from_dir(_write_folder(tmp_path / "x", trained, chat_template=escape))
    with pytest.raises(TokenizerError):
        sandboxed.apply_chat_template([{"role": "user", "content": "x"}])

    none = TextTokenizer.from_dir(_write_folder(tmp_path / "z", trained, chat_template=None))
    assert not none.has_chat_template
    with pytest.raises(TokenizerError) as missing:
        none.apply_chat_template([{"role": "user", "content": "x"}])
    assert missing.value.hint

    for bad in ("hello", [["role", "user"]]):
        with pytest.raises(UsageError):
            tok.apply_chat_template(bad)  # type: ignore[arg-type]


# --- bad folders --------------------------------------------------------------------------


def _expect_error(folder: Path) -> TokenizerError:
    with pytest.raises(TokenizerError) as info:
        TextTokenizer.from_dir(folder)
    assert info.value.hint
    return info.value


def test_missing_folder_and_files(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "tokenizer.json" in str(_expect_error(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer.json", "{not json"),
        ("tokenizer.json", '{"version": "1.0"}'),
        ("tokenizer.json", b"\xff\xfe\x00garbage"),
        ("tokenizer_config.json", "{truncated"),
        ("tokenizer_config.json", "[1, 2]"),
        ("tokenizer_config.json", b"\xff\xfe"),
        ("tokenizer_config.json", '{"eos_token": "<|missing|>"}'),
        ("tokenizer_config.json", '{"eos_token": 5}'),
        ("tokenizer_config.json", '{"add_bos_token": "yes"}'),
        ("tokenizer_config.json", '{"add_bos_token": true}'),
        ("tokenizer_config.json", '{"chat_template": 3}'),
        ("tokenizer_config.json", '{"additional_special_tokens": "<|im_end|>"}'),
        ("generation_config.json", '{"eos_token_id": "2"}'),
        ("generation_config.json", '{"eos_token_id": [2, -1]}'),
        ("config.json", '{"eos_token_id": true}'),
        ("config.json", "nope"),
        ("chat_template.jinja", b"\xff\xfe{{"),
    ],
)
def test_corrupt_files(tmp_path: Path, trained: Tokenizer, name: str, content: str | bytes) -> None:
    folder = _write_folder(tmp_path / "t", trained)
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    _expect_error(folder)


def test_tokenizer_json_alone_is_enough(tmp_path: Path, trained: Tokenizer) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    trained.save(str(folder / "tokenizer.json"))
    tok = TextTokenizer.from_dir(folder)
    assert tok.decode(tok.encode("héllo 🙂")) == "héllo 🙂"
    assert tok.eos_token_ids == frozenset()
    assert not tok.has_chat_template


def test_import_stays_light() -> None:
    heavy = ("torch", "transformers", "onnx", "jinja2")
    code = (
        "import sys, edgeoffload.device.tokenizer\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
