"""The conversation formats of the families (the evaluation's chat-format registry): rendering
equals the published chat templates token for token (real tokenizers from the shared folder when
present, tiny ones always), and the formats without a template give their published strings."""

from __future__ import annotations

import pytest

from sfmed.eval.chat_formats import CHAT_FORMATS, resolve_chat_format
from sfmed.models import get_family, registered_families

CHATS = [
    [{"role": "user", "content": "头痛发热怎么办？"}],
    [
        {"role": "system", "content": "你是一名医生。"},
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am a medical assistant."},
        {"role": "user", "content": "What is fever?"},
    ],
]

# The chat template of meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json (system handling as
# published; the "default system prompt" branch is left out: sfmed adds no default system).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def _ids(tok, text, fmt):
    return tok(text, add_special_tokens=fmt.add_special_tokens)["input_ids"]


def _template_ids(tok, chat):
    return tok.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]


def test_every_family_names_a_registered_format():
    from sfmed.config.sft_data import CHAT_FORMATS as SCHEMA_NAMES
    from sfmed.data.chat.formats import FORMATS

    for name in registered_families():
        assert get_family(name).chat_format in FORMATS, name
    # one registry: evaluation serves every format preprocessing encodes, the schema names them
    assert set(FORMATS) <= set(CHAT_FORMATS)
    assert set(SCHEMA_NAMES) == {"auto", *FORMATS}


@pytest.mark.parametrize("which", ["qwen2", "qwen3"])
def test_chatml_equals_the_qwen_templates(shared_dir, which):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_dir / "tokenizers" / which))
    fmt = resolve_chat_format("chatml", tok)
    for chat in CHATS:
        if which == "qwen2" and chat[0]["role"] != "system":
            # Qwen2's template adds "You are a helpful assistant." to a chat without a system
            chat = [{"role": "system", "content": "You are a helpful assistant."}, *chat]
        assert _ids(tok, fmt.render(chat, tok), fmt) == _template_ids(tok, chat)


def test_chatml_equals_the_tiny_tokenizers_template(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    fmt = CHAT_FORMATS["chatml"]
    chat = CHATS[1]
    assert _ids(tok, fmt.render(chat, tok), fmt) == _template_ids(tok, chat)


def _llama2_check(tok):
    tok.chat_template = LLAMA2_TEMPLATE
    fmt = CHAT_FORMATS["llama2"]
    for chat in CHATS:
        assert fmt.render(chat, tok) == tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        assert _ids(tok, fmt.render(chat, tok), fmt) == _template_ids(tok, chat)


def test_llama2_equals_the_published_template_with_the_real_tokenizer(shared_dir):
    from transformers import LlamaTokenizer

    model = shared_dir / "tokenizers" / "llama2-sentencepiece" / "tokenizer.model"
    tok = LlamaTokenizer(vocab_file=str(model), legacy=False)
    _llama2_check(tok)
    ids = _ids(tok, CHAT_FORMATS["llama2"].render(CHATS[1], tok), CHAT_FORMATS["llama2"])
    assert ids[0] == tok.bos_token_id == 1 and ids.count(tok.eos_token_id) == 1  # one answer


def _word_tokenizer(extra_ids: dict[str, int] | None = None):
    """A tiny word-level tokenizer with <s>/</s> specials and, optionally, specials at given
    ids (Baichuan's reserved 195/196)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        "[INST] [/INST] <<SYS>> <</SYS>> hello who are you i am a medical assistant what is fever"
    )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words.split() + [f"w{i}" for i in range(250)]:
        vocab.setdefault(w, len(vocab))
    inv = {v: k for k, v in vocab.items()}
    for piece, i in (extra_ids or {}).items():
        vocab.pop(inv[i])
        vocab[piece] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<s>", "</s>", *(extra_ids or {})]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=specials[2:],
    )  # fmt: skip
    return fast


def test_llama2_equals_the_published_template_tiny():
    _llama2_check(_word_tokenizer())


def test_baichuan_reserved_tokens_195_196():
    tok = _word_tokenizer({"<reserved_102>": 195, "<reserved_103>": 196})
    fmt = CHAT_FORMATS["baichuan"]
    chat = [
        {"role": "user", "content": "hello who are you"},
        {"role": "assistant", "content": "i am a medical assistant"},
        {"role": "user", "content": "what is fever"},
    ]
    enc = [tok.convert_tokens_to_ids(w) for w in ["hello", "who", "are", "you"]]
    ans = [tok.convert_tokens_to_ids(w) for w in ["i", "am", "a", "medical", "assistant"]]
    q2 = [tok.convert_tokens_to_ids(w) for w in ["what", "is", "fever"]]
    # DISC-MedLLM / Baichuan-13B-Chat's _build_chat_input: [195] + user + [196] + answer + [eos]
    want = [195, *enc, 196, *ans, 2, 195, *q2, 196]
    assert _ids(tok, fmt.render(chat, tok), fmt) == want


def test_formats_without_a_template_give_the_published_strings():
    chat = [{"role": "user", "content": "发热怎么办"}]
    assert CHAT_FORMATS["chinese_alpaca"].render(chat, None) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n发热怎么办\n\n### Response: "
    )
    assert CHAT_FORMATS["ziya"].render(chat, None) == "<human>:发热怎么办\n<bot>:"
    two = [*chat, {"role": "assistant", "content": "多喝水"}, {"role": "user", "content": "还有呢"}]
    # one BOS..EOS sequence per exchange (the tokenizer adds the first BOS)
    assert CHAT_FORMATS["ziya"].render(two, None) == (
        "<human>:发热怎么办\n<bot>:多喝水</s><s><human>:还有呢\n<bot>:"
    )
    assert CHAT_FORMATS["chimed"].render(chat, None) == "[human]:发热怎么办\n[bot]:"
    assert CHAT_FORMATS["chinese_alpaca"].add_special_tokens
    assert CHAT_FORMATS["ziya"].add_special_tokens
