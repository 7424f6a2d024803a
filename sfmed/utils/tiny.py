"""Tiny random models written with ``transformers``: test fixtures and the built-in demo.

Nothing is downloaded: the model is created from a config with random weights, and norms and
biases are randomised too so that a swapped or misplaced tensor changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch


def randomise_and_save(
    model_class,
    config,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Build ``model_class(config)`` with random weights and save it (safetensors + config).

    Norm weights scatter around 1 and biases around 0, and the other weights are larger than
    the default init, so that logits differ clearly between positions.
    """
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    model = model.to(dtype or torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    GenerationConfig(eos_token_id=config.eos_token_id, do_sample=False).save_pretrained(out)
    return out


def make_tiny_model(out_dir: str | Path, family: str = "qwen2", **kw) -> Path:
    """Write a tiny random HF model of ``family`` (a registered ``model_type``) to ``out_dir``."""
    from sfmed.models import get_family

    return get_family(family).make_tiny(out_dir, **kw)


def make_tiny_qwen2(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **config_kw,
) -> Path:
    """A tiny random Qwen2 (defaults: 4 layers, hidden 64, GQA 8/2, vocab 1000) in ``out_dir``."""
    return make_tiny_model(
        out_dir, "qwen2", seed=seed, dtype=dtype, max_shard_size=max_shard_size, **config_kw
    )


_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DEFAULT_CORPUS = (
    "患者男性，45岁，因发热、咳嗽三天就诊。体温38.5℃，白细胞升高，考虑细菌性肺炎。\n"
    "问：高血压患者平时饮食需要注意什么？答：低盐低脂饮食，戒烟限酒，规律运动，按时服药。\n"
    "糖尿病的典型症状是多饮、多食、多尿和体重下降。二甲双胍是2型糖尿病的一线用药。\n"
    "下列哪项是心肌梗死最常见的症状？A. 胸痛 B. 头痛 C. 腹泻 D. 皮疹 答案：A\n"
    "The quick brown fox jumps over the lazy dog. Aspirin 100 mg daily; CT, MRI, ECG.\n"
    "阿莫西林适用于敏感菌所致的呼吸道感染、泌尿道感染、皮肤软组织感染。\n"
)


def make_tiny_tokenizer(
    out_dir: str | Path, *, vocab_size: int = 600, corpus: str | None = None
) -> Path:
    """Train and save a small byte-level BPE tokenizer in Qwen2's shape (no download).

    It has Qwen2's special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) and the
    ChatML chat template, so chat/SFT/eval code paths run unchanged on tiny models. ``vocab_size``
    must not exceed the tiny model's vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus if corpus is not None else _DEFAULT_CORPUS
    tok.train_from_iterator([line for line in text.splitlines() if line] * 4, trainer=trainer)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = _CHATML_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def make_tiny_sentencepiece(
    out_dir: str | Path,
    *,
    vocab_size: int = 900,
    reserved: int = 0,
    corpus: str | None = None,
) -> Path:
    """Train and save a small SentencePiece BPE model in LLaMA's shape (no download):
    ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, byte fallback, ``tokenizer.model`` in ``out_dir``.

    ``reserved`` adds ``<reserved_3>`` ... ``<reserved_{reserved + 2}>`` as single-id symbols
    right after them (id = the number in the name), as Baichuan's vocabulary reserves ids (its
    chat format uses ids 195/196: ``reserved=194``). ``vocab_size`` must not exceed the tiny
    model's vocabulary.
    """
    import io

    import sentencepiece as spm

    text = corpus if corpus is not None else _DEFAULT_CORPUS
    lines = [line for line in text.splitlines() if line]
    symbols = [f"<reserved_{i}>" for i in range(3, 3 + reserved)]
    # control ids, reserved symbols, 256 byte pieces, every character of the corpus (spaces
    # become "▁"; NFKC may merge a few more, so this bound is at most a little high)
    least = 3 + reserved + 256 + len(set("".join(lines).replace(" ", "\u2581")) | {"\u2581"})
    if vocab_size < least:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for reserved={reserved} and this corpus: "
            f"it needs at least {least} ids"
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may hold fewer merges: take what there is
        character_coverage=1.0,
        byte_fallback=True,  # any text encodes without <unk>, as LLaMA's tokenizer does
        user_defined_symbols=symbols,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out
