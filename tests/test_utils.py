"""The core helpers: atomic outputs, the Megatron checkpoint layout, parallel-size checks,
dtype names, byte sizes, logging and the user-error types."""

import pytest

from sfmed.core import megatron_layout as ml
from sfmed.core.atomic import OutputExistsError, atomic_dir, atomic_write_text


def test_atomic_dir_renames_on_success_and_cleans_on_error(tmp_path):
    dst = tmp_path / "out"
    with atomic_dir(dst) as d:
        (d / "a.txt").write_text("x")
        assert not dst.exists()  # invisible until complete
    assert (dst / "a.txt").read_text() == "x"

    with pytest.raises(OutputExistsError, match="overwrite=true"), atomic_dir(dst):
        pass

    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "other") as d:
        (d / "half").write_text("partial")
        raise KeyboardInterrupt
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind

    with atomic_dir(dst, overwrite=True) as d:
        (d / "b.txt").write_text("y")
    assert sorted(p.name for p in dst.iterdir()) == ["b.txt"]


def test_tracker_and_resolve(tmp_path):
    with pytest.raises(ml.CheckpointNotFoundError, match="latest_checkpointed_iteration"):
        ml.read_tracker(tmp_path)
    (tmp_path / "iter_0000020").mkdir()
    (tmp_path / "iter_0000020" / "metadata.json").write_text("{}")
    ml.write_tracker(tmp_path, 20)
    assert ml.read_tracker(tmp_path) == 20
    assert ml.resolve_checkpoint(tmp_path) == tmp_path / "iter_0000020"
    assert ml.resolve_checkpoint(tmp_path / "iter_0000020") == tmp_path / "iter_0000020"
    ml.write_tracker(tmp_path, "release")
    with pytest.raises(ml.CheckpointNotFoundError, match="release"):
        ml.resolve_checkpoint(tmp_path)
    atomic_write_text(tmp_path / ml.TRACKER, "garbage\n")
    with pytest.raises(ml.CheckpointNotFoundError, match="garbage"):
        ml.read_tracker(tmp_path)
    ml.write_meta(tmp_path / "iter_0000020", {"tp": 2})
    assert ml.read_meta(tmp_path / "iter_0000020") == {"tp": 2}
    assert ml.iter_dir_name(7) == "iter_0000007" and ml.iter_dir_name("release") == "release"


def test_validate_parallel_sizes_message_lists_valid_products():
    from sfmed.core.errors import ConfigError
    from sfmed.core.parallel import validate_parallel_sizes

    assert validate_parallel_sizes(8, 2, 2) == 2
    assert validate_parallel_sizes(12, 2, 3, 2) == 1
    with pytest.raises(ConfigError) as e:
        validate_parallel_sizes(6, 2, 2)
    assert str(e.value) == (
        "world size 6 is not divisible by parallel.tp*pp*cp = 2*2*1 = 4; launch a multiple of 4 "
        "processes (torchrun --nproc_per_node) or choose sizes whose product divides 6: "
        "[1, 2, 3, 6]"
    )
    for bad in ({"tp": 0}, {"pp": -1}, {"cp": 0}):
        sizes = {"tp": 1, "pp": 1, "cp": 1, **bad}
        ((name, value),) = bad.items()
        with pytest.raises(ConfigError, match=rf"parallel.{name}={value} must be an integer >= 1"):
            validate_parallel_sizes(4, **sizes)


def test_validate_parallel_model_split():
    from types import SimpleNamespace

    from sfmed.core.errors import ConfigError
    from sfmed.core.parallel import validate_parallel

    arch = SimpleNamespace(
        num_layers=6, num_attention_heads=12, num_query_groups=4, ffn_hidden_size=96
    )
    validate_parallel(arch, 4, 3)
    validate_parallel(arch, 2, 2, layers_per_stage=[2, 4])
    cases = [
        (
            (3, 1),
            r"parallel.tp=3 does not divide num_key_value_heads \(query groups\)=4 .*"
            r"valid tp for this model: \[1, 2, 4\]",
        ),
        ((8, 1), r"parallel.tp=8 does not divide num_attention_heads=12"),
        ((1, 4), r"parallel.pp=4 does not divide num_layers=6; valid pp: \[1, 2, 3, 6\]"),
        ((1, 7), r"parallel.pp=7 exceeds num_layers=6"),
    ]
    for (tp, pp), match in cases:
        with pytest.raises(ConfigError, match=match):
            validate_parallel(arch, tp, pp)
    with pytest.raises(ConfigError, match=r"middle stages must hold equal"):
        validate_parallel(arch, 1, 4, layers_per_stage=[1, 1, 2, 2])
    with pytest.raises(ConfigError, match=r"every stage needs >= 1 layer"):
        validate_parallel(arch, 1, 2, layers_per_stage=[0, 6])


def test_validate_vpp():
    from sfmed.core.errors import ConfigError
    from sfmed.core.parallel import validate_vpp

    assert validate_vpp(8, 2, None) is None and validate_vpp(8, 2, 1) is None
    assert validate_vpp(8, 2, 2, num_microbatches=4) == 2
    with pytest.raises(ConfigError, match=r"needs pipeline parallelism"):
        validate_vpp(8, 1, 2)
    with pytest.raises(
        ConfigError, match=r"pp\*vpp = 2\*3 does not divide num_layers=8.*\[1, 2, 4\]"
    ):
        validate_vpp(8, 2, 3)
    with pytest.raises(ConfigError, match=r"micro-batches \(3 = .*multiple of parallel.pp=2"):
        validate_vpp(8, 2, 2, num_microbatches=3)


def test_validate_sequence_split():
    from sfmed.core.errors import ConfigError
    from sfmed.core.parallel import validate_sequence_split

    validate_sequence_split(30, tp=4)  # no sequence parallelism: any length
    validate_sequence_split(32, tp=4, sequence_parallel=True)
    validate_sequence_split(32, tp=1, cp=4, impl="transformer_engine")
    with pytest.raises(ConfigError, match=r"seq_length=30 is not divisible by parallel.tp=4"):
        validate_sequence_split(30, tp=4, sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"parallel.cp=2 needs Transformer Engine"):
        validate_sequence_split(32, tp=1, cp=2)
    with pytest.raises(ConfigError, match=r"seq_length=36 must be divisible by 2 × parallel.cp"):
        validate_sequence_split(36, tp=1, cp=4, impl="transformer_engine")


def test_dtype_names():
    import torch

    from sfmed.core.dtypes import dtype_name, torch_dtype
    from sfmed.core.errors import ConfigError

    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("fp32") is torch.float32
    assert torch_dtype("torch.float16") is torch.float16
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ConfigError, match=r"train.precision='int8'.*\['bfloat16', 'float16'"):
        torch_dtype("int8", what="train.precision")


def test_parse_size():
    from sfmed.core.errors import ConfigError
    from sfmed.core.units import parse_size

    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size(123) == 123
    for bad in ("lots", "", "0B", 0, "1.2.3GB"):
        with pytest.raises(ConfigError, match="max_shard_size"):
            parse_size(bad)


def test_user_errors_share_one_base():
    from sfmed.convert import errors as convert_errors
    from sfmed.core import errors

    for cls in (
        OutputExistsError,
        ml.CheckpointNotFoundError,
        errors.CheckpointFormatError,
        errors.CheckpointMismatchError,
        errors.HFCheckpointError,
        errors.ConfigError,
    ):
        assert issubclass(cls, errors.UserError), cls
    assert issubclass(OutputExistsError, FileExistsError)  # callers catching the OS type still do
    assert issubclass(ml.CheckpointNotFoundError, FileNotFoundError)
    assert convert_errors.CheckpointFormatError is errors.CheckpointFormatError
    assert issubclass(convert_errors.HFCheckpointError, convert_errors.ConversionError)


def test_logging_levels_and_filters(capfd):
    import logging
    import warnings

    from sfmed.core.errors import ConfigError
    from sfmed.core.logging import setup_logging

    try:
        setup_logging("INFO", rank=0)
        assert logging.getLogger().level == logging.INFO
        assert logging.getLogger("megatron.core").getEffectiveLevel() == logging.WARNING
        setup_logging("DEBUG", rank=3)  # other ranks report errors only (warnings: rank 0's)
        assert logging.getLogger().level == logging.ERROR
        with pytest.raises(ConfigError, match="logging level 'LOUD'"):
            setup_logging("LOUD")
        with warnings.catch_warnings(record=True) as caught:
            setup_logging()
            warnings.simplefilter("default")  # what a user's own code would see...
            from sfmed.core.logging import quiet_third_party

            quiet_third_party()  # ...after sfmed's filters are installed
            warnings.warn_explicit(
                "Transformer Engine and Apex are not installed. Falling back",
                UserWarning,
                "x.py",
                1,
                module="megatron.core.optimizer",
            )
            warnings.warn_explicit("a real problem", UserWarning, "y.py", 1, module="mine")
        assert [str(w.message) for w in caught] == ["a real problem"]
    finally:
        logging.basicConfig(level=logging.WARNING, force=True)


def test_tiny_sentencepiece_llama_ids_and_baichuan_reserved(tmp_path):
    """The tiny SentencePiece builder: LLaMA's control ids, byte fallback (no <unk> on unseen
    text), and with ``reserved=194`` single ids 195/196 that the baichuan chat format binds."""
    import sentencepiece as spm

    from sfmed.data.chat.formats import make_format
    from sfmed.data.tokenizer import load_tokenizer
    from sfmed.utils.tiny import make_tiny_sentencepiece

    plain = make_tiny_sentencepiece(tmp_path / "llama", vocab_size=500)
    sp = spm.SentencePieceProcessor(model_file=str(plain / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.get_piece_size() <= 500
    unseen = "罕见字龘 and Ünïcode"
    ids = sp.encode(unseen)
    assert sp.unk_id() not in ids and sp.decode(ids) == unseen

    bc = make_tiny_sentencepiece(tmp_path / "baichuan", reserved=194)
    tok = load_tokenizer(bc, with_hash=False)
    assert tok.info.eod_id == 2 and tok.info.vocab_size <= 900
    fmt = make_format("baichuan", id_to_token=tok.id_to_token)
    assert (fmt.user, fmt.assistant) == ("<reserved_195>", "<reserved_196>")
    assert tok.token_id(fmt.user) == 195 and tok.token_id(fmt.assistant) == 196
    ids, _ = tok.encode_flat([f"问{fmt.user}答{fmt.assistant}"])
    assert 195 in ids.tolist() and 196 in ids.tolist()  # one id each, even inside text
    with pytest.raises(ValueError, match="vocab_size=300 is too small for reserved=194"):
        make_tiny_sentencepiece(tmp_path / "small", vocab_size=300, reserved=194)
