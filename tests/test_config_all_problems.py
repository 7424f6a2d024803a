"""Every problem of one config group is reported at once, not only the first.

Each case gives a schema two (or more) independent bad values; the expected messages are written
out here, so a schema that stops at its first problem, or rewords one, fails.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

from conftest import REPO
from sfmed.config import convert, data, dpo, sft, sft_data
from sfmed.config import eval as eval_cfg
from sfmed.config.logging import LoggingConfig
from sfmed.config.model import ModelConfig
from sfmed.config.optim import OptimConfig
from sfmed.config.parallel import ParallelConfig
from sfmed.config.pretrain_data import PretrainDataConfig
from sfmed.config.run import RunConfig
from sfmed.config.train import TrainConfig
from sfmed.core import parallel as core_parallel
from sfmed.core.errors import ConfigError, ConfigErrors, Problems

CASES = {
    "optim": (
        lambda: OptimConfig(lr=-1.0, clip_grad=-1.0),
        # min_lr is not compared with an lr that is invalid itself.
        ["optim.lr=-1.0 must be > 0", "optim.weight_decay and optim.clip_grad must be >= 0"],
    ),
    "optim_three": (
        lambda: OptimConfig(warmup_steps=-2, decay_style="step", max_consecutive_skips=0),
        [
            "optim.warmup_steps=-2 must be >= 0",
            "optim.decay_style='step' is not one of ['cosine', 'linear', 'constant', 'WSD', "
            "'inverse-square-root']",
            "optim.max_consecutive_skips=0 must be >= 1",
        ],
    ),
    "train": (
        lambda: TrainConfig(steps=0, micro_batch_size=0),
        # No divisibility check against a micro batch of 0 (and no ZeroDivisionError).
        [
            "train.steps=0 must be >= 1",
            "train.global_batch_size=8 and train.micro_batch_size=0 must be >= 1",
        ],
    ),
    "train_divisible": (
        lambda: TrainConfig(global_batch_size=6, micro_batch_size=4, save_interval=-1),
        [
            "train.global_batch_size=6 is not divisible by train.micro_batch_size=4",
            "train.save_interval=-1 must be >= 0",
        ],
    ),
    "parallel": (
        lambda: ParallelConfig(
            tp=0, cp=0, overlap_param_gather=True, use_distributed_optimizer=False
        ),  # fmt: skip
        [
            "parallel.tp=0 must be >= 1",
            "parallel.cp=0 must be >= 1",
            "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true",
        ],
    ),
    "parallel_recompute": (
        # An unknown method is reported once, not also as "only applies to full".
        lambda: ParallelConfig(vpp=0, recompute_method="all"),
        [
            "parallel.vpp=0 must be >= 1 or null",
            "parallel.recompute_method='all' is not one of [None, 'uniform', 'block']",
        ],
    ),
    "run": (
        lambda: RunConfig(device="gpu", run_name="", ckpt_dir="runs/x"),
        [
            "device='gpu' is not one of ['auto', 'cuda', 'cpu']",
            "run_name is empty; give the run a name, e.g. run_name=cpt-7b",
        ],
    ),
    "logging": (
        lambda: LoggingConfig(interval=0, level="LOUD", peak_tflops=0),
        [
            "logging.interval=0 must be >= 1",
            "logging.level='LOUD': use DEBUG, INFO, WARNING or ERROR",
            "logging.peak_tflops=0 must be > 0 or null",
        ],
    ),
    "model": (
        # Invalid sizes are reported; no divisibility check divides by a 0 of them.
        lambda: ModelConfig(num_layers=0, num_attention_heads=0, transformer_impl="te"),
        [
            "model.transformer_impl='te' is not one of ['auto', 'local', 'transformer_engine']",
            "model.num_layers=0 must be >= 1",
            "model.num_attention_heads=0 must be >= 1",
        ],
    ),
    "model_divisible": (
        lambda: ModelConfig(num_attention_heads=6, num_query_groups=4, hidden_size=64),
        [
            "model.num_attention_heads=6 is not divisible by model.num_query_groups=4",
            "model.hidden_size=64 is not divisible by model.num_attention_heads=6; set "
            "model.kv_channels",
        ],
    ),
    "pretrain_data": (
        lambda: PretrainDataConfig(seq_length=0, num_workers=-1, split="1,2"),
        [
            "data.seq_length=0 must be >= 1",
            "data.num_workers=-1 must be >= 0",
            "data.split='1,2' must be three non-negative numbers train,valid,test with "
            "train > 0, e.g. '99,1,0'",
        ],
    ),
    "sft_data": (
        lambda: sft.SFTDataConfig(seq_length=8, num_workers=-1, mask="first"),
        [
            "data.seq_length=8 must be >= 16 (or null)",
            "data.num_workers=-1 must be >= 0",
            "data.mask='first' is not one of ['all', 'last'] (or null)",
        ],
    ),
    "sft_blend": (
        lambda: sft.ChatDataConfig(blend=[{"weight": 1.0}, {"prefix": "b", "weight": 0}]),
        [
            "data.blend[0]={'weight': 1.0} needs a prefix: {prefix: <path>, weight: <w>}",
            "data.blend[1].weight=0 must be a number > 0",
        ],
    ),
    "sft_run": (
        lambda: sft.SFTConfig(engine="trl", device="tpu"),
        [
            "device='tpu' is not one of ['auto', 'cuda', 'cpu']",
            "engine='trl' is not one of ['mcore', 'hf']",
        ],
    ),
    "chat": (
        lambda: sft_data.ChatDataConfig(mask="first", seq_length=8, batch_size=0),
        [
            "chat.mask='first' is not one of ['all', 'last']",
            "chat.seq_length=8 must be >= 16",
            "chat.batch_size=0 must be >= 1",
        ],
    ),
    "chat_roles": (
        lambda: sft_data.ChatOptions(roles={"a": "bot", "b": "robot"}),
        [
            "turns.roles.a='bot' must be user, assistant, system or null (drop)",
            "turns.roles.b='robot' must be user, assistant, system or null (drop)",
        ],
    ),
    "dpo_loss": (
        lambda: dpo.DPOLossConfig(beta=0, rpo_alpha=-1.0),
        [
            "dpo.beta=0 must be a number > 0 (typical: 0.1)",
            "dpo.rpo_alpha=-1.0 must be >= 0, or null to switch the NLL term off",
        ],
    ),
    "dpo_unknown_loss": (
        # label_smoothing is not judged against a loss that does not exist.
        lambda: dpo.DPOLossConfig(loss_type="kto", beta=-1, label_smoothing=0.9),
        [
            "dpo.loss_type='kto' is not one of ['sigmoid', 'ipo', 'hinge', 'robust']; "
            "pick one of those",
            "dpo.beta=-1 must be a number > 0 (typical: 0.1)",
        ],
    ),
    "dpo_reference": (
        lambda: dpo.ReferenceConfig(mode="cached", checkpoint=" "),
        [
            "reference.mode='cached' is not one of ['precompute', 'on_the_fly']",
            "reference.checkpoint is empty; give a checkpoint path, or null for init_from",
        ],
    ),
    "dpo_run": (
        lambda: dpo.DPOConfig(engine="trl", resume=""),
        [
            "resume is empty; use auto, never, or a checkpoint path",
            "engine='trl' is not one of ['mcore', 'hf']",
        ],
    ),
    "convert_parallel": (
        lambda: convert.ConvertParallelConfig(tp=0, pp=0, layers_per_stage=[2, 2]),
        # No "needs parallel.pp=0 entries" for an invalid pp.
        ["parallel.tp=0 must be >= 1", "parallel.pp=0 must be >= 1"],
    ),
    "convert": (
        lambda: convert.ConvertConfig(to="hf", src="a", dtype="fp8", max_shard_size="big"),
        [
            "dst is required: python launch/convert.py to=hf src=<folder> dst=<folder>",
            "dtype='fp8' is not one of ['auto', 'bfloat16', 'float16', 'float32']",
            "max_shard_size='big': use e.g. 5GB, 500MB or a number of bytes",
        ],
    ),
    "verify": (
        lambda: convert.VerifyConfig(hf="a", mcore="b", device="tpu", batch=0),
        [
            "device='tpu' is not one of ['auto', 'cuda', 'cpu']",
            "batch=0 and seq_length=32 must be >= 1",
        ],
    ),
    "quickstart": (
        lambda: convert.QuickstartConfig(tp=0, device="tpu"),
        [
            "tp=0 and pp=2 must be >= 1",
            "device='tpu' is not one of ['auto', 'cuda', 'cpu']",
        ],
    ),
    "cleaning": (
        lambda: data.CleanConfig(unicode="NFX", min_chars=-1, max_chars=-2),
        [
            "cleaning.unicode='NFX' is not one of ['NFC', 'NFKC', 'NFD', 'NFKD', 'none']",
            "cleaning.min_chars=-1 must be >= 0",
            "cleaning.max_chars=-2 must be >= 0",
        ],
    ),
    "near_dedup": (
        lambda: data.NearDedupConfig(threshold=1.5, num_perm=8, ngram=0),
        [
            "near_dedup.threshold=1.5 must be in (0, 1)",
            "near_dedup.num_perm=8 must be >= 16",
            "near_dedup.ngram=0 must be >= 1",
        ],
    ),
    "preprocess": (
        lambda: data.PreprocessConfig(
            tokenizer="t",
            output_dir="o",
            input="a.jsonl",
            workers=-1,
            chunk_mb=0,
            reader="xml",
            encoding="klingon",
        ),  # fmt: skip
        [
            "workers=-1 must be >= 0 (0 = auto)",
            "chunk_mb=0 must be > 0",
            "reader='xml' is not one of ['auto', 'text', 'jsonl', 'json', 'csv', 'tsv', 'parquet']",
            "encoding='klingon' is not a codec Python knows; use e.g. utf-8, gb18030, utf-16",
        ],
    ),
    "preprocess_sources": (
        lambda: data.PreprocessConfig(
            tokenizer="???",
            output_dir="o",
            sources={
                "a": {"files": [], "render": "template"},
                "b": {"files": ["x"], "min_chars": -1},
            },
        ),
        [
            "tokenizer is not set; pass tokenizer=<path>",
            "sources.a.render=template needs sources.a.template='...{name}...'",
            "sources.a.files is empty; list the corpus files or globs",
            "sources.b.min_chars=-1 must be >= 0 (0 disables the limit)",
        ],
    ),
    "decoding": (
        lambda: eval_cfg.DecodingConfig(max_new_tokens=0, top_p=0.0),
        [
            "decoding.max_new_tokens=0 must be >= 1",
            "decoding.top_p=0.0 must be in (0, 1]",
        ],
    ),
    "eval_hf": (
        lambda: eval_cfg.HFConfig(batch_size=0, device="tpu"),
        ["hf.batch_size=0 must be >= 1", "hf.device='tpu': use auto, cpu, cuda or cuda:N"],
    ),
    "mcq": (
        lambda: eval_cfg.MCQConfig(mode="score", shots=2),
        [
            "mcq.mode='score' is not one of ['generate', 'loglik']",
            "mcq.shots=2 needs mcq.dev_data=<dev split file or folder>",
        ],
    ),
    "mcq_prompt": (
        lambda: eval_cfg.MCQPromptConfig(
            preset="helm", continuation="word", scoring="ppl", option_format="{letter}"
        ),
        [
            "mcq.prompt.preset='helm' is not one of ['sfmed', 'lm_eval', 'opencompass', "
            "'opencompass_gen']",
            "mcq.prompt.continuation='word' is not one of ['letter', 'option_text']",
            "mcq.prompt.scoring='ppl' is not one of ['continuation', 'sequence']",
            "mcq.prompt.option_format='{letter}' must contain {letter} and {text}",
        ],
    ),
    "metric": (
        lambda: eval_cfg.TextMetricConfig(tokenizer="word", epsilon=-0.1),
        [
            "metric.tokenizer='word' is not one of ['char', 'jieba']",
            "metric.epsilon=-0.1 must be >= 0",
        ],
    ),
    "eval": (
        lambda: eval_cfg.EvalConfig(task="mcq", limit=0, model="m", generations="g.jsonl"),
        [
            "task=mcq needs data=<file or folder>",
            "limit=0 must be >= 1 (or null for all)",
            "pass either model= (generate) or generations= (score a file)",
        ],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_independent_problem_of_a_schema_is_reported(name):
    build, expected = CASES[name]
    with pytest.raises(ConfigErrors) as e:
        build()
    assert e.value.problems == expected
    body = "".join(f"\n  - {m}" for m in expected)
    assert str(e.value) == f"{len(expected)} problems:{body}"


def test_eval_problems_stay_eval_config_errors():
    with pytest.raises(eval_cfg.EvalConfigError) as e:
        eval_cfg.HFConfig(batch_size=0, device="tpu")
    assert len(e.value.problems) == 2
    # One problem: the message is exactly that problem, as before.
    with pytest.raises(eval_cfg.EvalConfigError) as e:
        eval_cfg.HFConfig(batch_size=0)
    assert str(e.value) == "hf.batch_size=0 must be >= 1"
    # An unknown task is reported without the answer checks that assume a known one.
    with pytest.raises(ConfigErrors) as e:
        eval_cfg.EvalConfig(task="quiz", backend="tgi", data="d")
    assert e.value.problems == [
        "task='quiz' is not one of " + str(list(eval_cfg.TASKS)),
        "backend='tgi' is not one of ['hf', 'transformers', 'vllm', 'openai']",
    ]


def test_one_problem_reads_exactly_as_before():
    with pytest.raises(ConfigError) as e:
        OptimConfig(lr=0.0)
    assert str(e.value) == "optim.lr=0.0 must be > 0"
    assert OptimConfig().lr == 1e-5 and TrainConfig().steps >= 1  # defaults still validate
    data.SourceConfig(files=["a.jsonl"]).validate("a")  # a valid source raises nothing


def test_problems_collector():
    p = Problems()
    assert not p and p.check(True, "unused")
    assert not p.check(1 > 2, "one")
    assert not p.choice("x", "c", ("a", "b"))
    with p.collect():
        raise ConfigErrors(["two", "three"])
    with p.collect():
        raise ConfigError("four")
    assert len(p) == 5
    with pytest.raises(ConfigErrors) as e:
        p.raise_if_any()
    assert e.value.problems == ["one", "x='c' is not one of ['a', 'b']", "two", "three", "four"]
    # A bug is not a config problem: it propagates.
    with pytest.raises(ZeroDivisionError), p.collect():
        1 / 0  # noqa: B018
    Problems().raise_if_any()  # nothing recorded, nothing raised
    # The same problem found twice (by a group and by a cross-group check) is listed once.
    assert ConfigErrors(["a", "b", "a"]).problems == ["a", "b"]


def _arch(**kw):
    base = dict(num_attention_heads=8, num_query_groups=2, kv_channels=8,
                ffn_hidden_size=128, num_layers=4)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    "call, expected",
    [
        (
            lambda: core_parallel.validate_parallel_sizes(4, 0, 0),
            ["parallel.tp=0 must be an integer >= 1", "parallel.pp=0 must be an integer >= 1"],
        ),
        (
            lambda: core_parallel.validate_parallel(_arch(), tp=3, pp=3),
            [
                "parallel.tp=3 does not divide num_attention_heads=8; valid tp for this model: "
                "[1, 2, 4, 8]",
                "parallel.pp=3 does not divide num_layers=4; valid pp: [1, 2, 4] (or give an "
                "uneven layout with layers_per_stage)",
            ],
        ),
        (
            lambda: core_parallel.validate_parallel(_arch(), tp=2, pp=2, layers_per_stage=[0, 3]),
            [
                "layers_per_stage=[0, 3] must have parallel.pp=2 entries summing to num_layers=4",
                "layers_per_stage=[0, 3]: every stage needs >= 1 layer",
            ],
        ),
        (
            lambda: core_parallel.validate_vpp(6, pp=2, vpp=2, num_microbatches=3),
            [
                "parallel.pp*vpp = 2*2 does not divide num_layers=6; choose vpp so that every "
                "virtual stage gets the same number of layers (valid vpp at pp=2: [1, 3])",
                "parallel.vpp=2: the interleaved schedule needs the number of micro-batches (3 = "
                "global_batch_size / (micro_batch_size × dp)) to be a multiple of parallel.pp=2; "
                "raise train.global_batch_size",
            ],
        ),
        (
            lambda: core_parallel.validate_sequence_split(7, tp=2, cp=2, sequence_parallel=True),
            [
                "data.seq_length=7 is not divisible by parallel.tp=2 (sequence parallelism "
                "splits the sequence over TP ranks)",
                "parallel.cp=2 needs Transformer Engine attention "
                "(model.transformer_impl=transformer_engine); set parallel.cp=1",
                "data.seq_length=7 must be divisible by 2 × parallel.cp",
            ],
        ),
    ],
)
def test_parallel_checks_report_every_independent_problem(call, expected):
    with pytest.raises(ConfigErrors) as e:
        call()
    assert e.value.problems == expected


def test_validate_run_config_lists_each_problem_of_a_group(tmp_path):
    from hydra import compose, initialize_config_dir

    from sfmed.config.pretrain import PretrainConfig, register
    from sfmed.config.validate import validate_run_config

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[
            "model=tiny", "optim.lr=-1", "optim.clip_grad=-1", "train.steps=0",
            "train.micro_batch_size=0", f"ckpt_dir={tmp_path}/r"])  # fmt: skip
    with pytest.raises(ConfigErrors) as e:
        validate_run_config(cfg, PretrainConfig, world_size=2)
    assert e.value.problems == [
        "optim.lr=-1.0 must be > 0",
        "optim.weight_decay and optim.clip_grad must be >= 0",
        "train.steps=0 must be >= 1",
        "train.global_batch_size=8 and train.micro_batch_size=0 must be >= 1",
    ]


def test_a_bad_nested_config_does_not_hide_its_groups_own_problems(tmp_path):
    """OmegaConf builds ``logging.wandb`` before ``logging``: both levels are still reported."""
    from hydra import compose, initialize_config_dir

    from sfmed.config.pretrain import PretrainConfig, register
    from sfmed.config.validate import validate_run_config

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[
            "model=tiny", "logging.wandb.mode=bad", "logging.interval=0",
            f"ckpt_dir={tmp_path}/r"])  # fmt: skip
    with pytest.raises(ConfigErrors) as e:
        validate_run_config(cfg, PretrainConfig, world_size=1)
    assert e.value.problems == [
        "logging.wandb.mode='bad' is not one of ['online', 'offline', 'disabled']",
        "logging.interval=0 must be >= 1",
    ]


@pytest.mark.dist
def test_torchrun_prints_each_problem_of_two_groups_once_and_every_rank_exits_2(torchrun, tmp_path):
    problems = [
        "optim.lr=-1.0 must be > 0",
        "optim.weight_decay and optim.clip_grad must be >= 0",
        "train.steps=0 must be >= 1",
    ]
    start = time.monotonic()
    proc = torchrun(REPO / "launch/pretrain.py", "device=cpu", "model=tiny", "optim.lr=-1",
                    "optim.clip_grad=-1", "train.steps=0", f"ckpt_dir={tmp_path}/r",
                    f"data.prefix={tmp_path}/none", nproc=2, timeout=180, check=False)  # fmt: skip
    wall = time.monotonic() - start
    out = proc.stdout + proc.stderr
    print(f"torchrun with 3 config problems: exit {proc.returncode} after {wall:.1f} s")
    assert out.count("pretrain: error:") == 1, out  # printed once (rank 0)
    assert "3 problems:" in out, out
    for m in problems:
        assert out.count(m) == 1, (m, out)
    # No worker printed a traceback: the one there is, is torchrun's own report that its
    # children failed (ChildFailedError), raised in the launcher, not in sfmed.
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "ChildFailedError" in out, out
    frames = [ln for ln in out.splitlines() if ln.lstrip().startswith("File ")]
    assert not [f for f in frames if "sfmed" in f or "launch/" in f], out
    codes = re.findall(r"exitcode\s+:\s+(-?\d+) \(pid: \d+\)", out)
    assert sorted(codes) == ["2", "2"], out  # every rank exited 2 by itself
    assert not (tmp_path / "r").exists()
    # Validated before megatron-core is imported: seconds on a loaded 2-core machine.
    assert wall < 20, wall


def test_single_process_entries_report_every_nested_groups_problems():
    """``build_config`` (evaluate, convert, preprocess, verify, quickstart, pipeline): each nested
    group's problems and the top level's own, with the schema's own error type."""
    from omegaconf import OmegaConf

    from sfmed.config.validate import build_config

    cfg = OmegaConf.structured(eval_cfg.EvalConfig)
    cfg.task, cfg.data, cfg.generations = "mcq", "d.jsonl", "g.jsonl"
    cfg.decoding.top_p, cfg.hf.batch_size, cfg.mcq.prompt.scoring, cfg.limit = 0.0, 0, "ppl", 0
    with pytest.raises(eval_cfg.EvalConfigError) as e:
        build_config(cfg)
    assert isinstance(e.value, ConfigErrors)
    assert e.value.problems == [
        "decoding.top_p=0.0 must be in (0, 1]",
        "hf.batch_size=0 must be >= 1",
        "mcq.prompt.scoring='ppl' is not one of ['continuation', 'sequence']",
        "limit=0 must be >= 1 (or null for all)",
    ]
    cfg.decoding.top_p, cfg.hf.batch_size, cfg.mcq.prompt.scoring, cfg.limit = 1.0, 1, None, 1
    assert build_config(cfg).limit == 1
