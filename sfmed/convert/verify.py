"""Check a conversion by its logits: transformers on the HF folder vs megatron-core's GPTModel on
the Megatron checkpoint, on the same tokens.

The megatron side runs in ``torchrun --nproc_per_node tp*pp`` workers
(:mod:`sfmed.convert.logits_worker`; CPU emulation with gloo on a machine without GPUs), which
load the checkpoint with :func:`sfmed.convert.load_mcore_weights` and run megatron's pipeline
schedule forward-only. The HF side runs in this process: first, so that the two models are never
in memory together, or (models under 1 GiB) while the workers start up.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from sfmed.core.dtypes import FLOAT_DTYPES, dtype_name, torch_dtype
from sfmed.core.errors import ConfigError
from sfmed.core.ports import free_port

log = logging.getLogger(__name__)
# Defaults per compute dtype. fp32 kernels agree to rounding (measured ~2e-6 on the tiny model).
# In bf16 the two stacks differ in GEMM accumulation order, norm and softmax precision: a logit
# moves by up to ~0.1 on the tiny model and near-ties flip (top-1 agreement ~0.96 measured on CPU),
# so the distribution (KL, ~5e-5 measured) is the tight check; a wrong conversion gives KL ~ 1.
DEFAULT_TOLERANCES = {
    torch.float32: {"max_abs_diff": 1e-4, "max_kl": 1e-6, "min_top1": 1.0},
    torch.bfloat16: {"max_abs_diff": 1.0, "max_kl": 5e-3, "min_top1": 0.9},
    torch.float16: {"max_abs_diff": 0.5, "max_kl": 2e-3, "min_top1": 0.93},
}


@dataclass(frozen=True)
class LogitsComparison:
    """How far the megatron logits are from the HF reference."""

    max_abs_diff: float
    mean_abs_diff: float
    kl: float
    """Mean over positions of KL(p_hf || p_megatron), in nats."""
    top1_agreement: float
    positions: int

    def passes(self, max_abs_diff: float, max_kl: float, min_top1: float) -> bool:
        """Within all three tolerances."""
        return (
            self.max_abs_diff <= max_abs_diff
            and self.kl <= max_kl
            and self.top1_agreement >= min_top1
        )

    def line(self) -> str:
        """One-line report."""
        return (
            f"max|dlogit|={self.max_abs_diff:.3g} mean|dlogit|={self.mean_abs_diff:.3g} "
            f"KL={self.kl:.3g} top1={self.top1_agreement:.4f} over {self.positions} positions"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> LogitsComparison:
    """Compare two [batch, seq, vocab] logit tensors (computed in fp32)."""
    if ref.shape != test.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(test.shape)}")
    ref, test = ref.float(), test.float()
    diff = (ref - test).abs()
    logp = torch.log_softmax(ref, -1)
    logq = torch.log_softmax(test, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    top1 = (ref.argmax(-1) == test.argmax(-1)).float()
    return LogitsComparison(
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        kl=float(kl.mean()),
        top1_agreement=float(top1.mean()),
        positions=int(top1.numel()),
    )


def make_tokens(vocab_size: int, batch: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids [batch, seq_length] (every id is a valid input)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_length), generator=g)


def hf_logits(
    hf_dir: str | Path, tokens: torch.Tensor, dtype: torch.dtype, device: str
) -> torch.Tensor:
    """Logits of the family's transformers causal LM for ``tokens`` (on CPU, fp32)."""
    from sfmed.models import arch_from_hf_config, family_for

    return family_for(arch_from_hf_config(hf_dir)).reference_logits(hf_dir, tokens, dtype, device)


def build_and_load(
    ckpt: str | Path,
    dtype: torch.dtype,
    device: str,
    impl: str = "local",
    attention: str = "sdpa",
):
    """Inside initialised megatron parallel state: build this rank's GPTModel stage from the
    checkpoint's metadata with training's layer spec (``impl``/``attention`` as in
    ``model.transformer_impl``/``model.attention``) and load its weights. Returns
    (model, arch)."""
    from megatron.core import parallel_state as ps

    from sfmed.convert.mcore_to_hf import checkpoint_arch
    from sfmed.core.ckpt_load import load_mcore_weights
    from sfmed.models import build_model, decoder_layer_spec, transformer_config

    arch, padded = checkpoint_arch(ckpt)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = transformer_config(arch, tp=tp, pp=pp, params_dtype=dtype)
    model = build_model(
        arch,
        config,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        spec=decoder_layer_spec(config, impl, attention),
        padded_vocab_size=padded,
    )
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    load_mcore_weights([model], ckpt)
    return model.eval(), arch


def forward_logits(model, vocab_size: int, tokens: torch.Tensor, device: str):
    """Run megatron's pipeline schedule forward-only on ``tokens`` [batch, seq]. Returns the
    full-vocabulary logits (padding cut, fp32, CPU) on the last stage and None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    tokens = tokens.to(device)

    def step(data, m):
        toks = next(data)
        pos = torch.arange(s, device=toks.device).unsqueeze(0).expand(b, -1)
        out = m(toks, pos, None)

        def collect(o):
            full = gather_from_tensor_model_parallel_region(o)
            return o.new_zeros(()), {"logits": full[..., :vocab_size].float().cpu()}

        return out, collect

    with torch.no_grad():
        res = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    return res[0]["logits"] if ps.is_pipeline_last_stage() else None


def mcore_logits(
    ckpt: str | Path,
    tokens: torch.Tensor,
    dtype: torch.dtype,
    device: str,
    impl: str = "local",
    attention: str = "sdpa",
):
    """:func:`build_and_load` + :func:`forward_logits` (run on every rank)."""
    model, arch = build_and_load(ckpt, dtype, device, impl, attention)
    return forward_logits(model, arch.vocab_size, tokens, device)


def resolve_compute(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """('cpu'|'cuda', torch dtype) for the config values device=auto|cpu|cuda, dtype=auto|..."""
    from sfmed.core.distributed import resolve_device

    dev = resolve_device(device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev == "cuda" else torch.float32
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of auto, {', '.join(FLOAT_DTYPES)}")
    return dev, torch_dtype(dtype)


OVERLAP_MAX_BYTES = 1 << 30
"""Models up to this size run the transformers reference while the megatron workers start (both
in memory at once); larger ones run one after the other."""


def model_bytes(arch, dtype: torch.dtype) -> int:
    """Bytes of ``arch``'s weights in ``dtype`` (from its family's tensor table)."""
    from sfmed.models import family_for

    table = family_for(arch).mapping(arch)
    numel = sum(math.prod(s) for m, _ in table.order(arch.num_layers) for s in m.hf_shapes(arch))
    return numel * dtype.itemsize


def run_mcore_logits(
    ckpt: str | Path,
    tokens: torch.Tensor,
    *,
    tp: int = 1,
    pp: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    impl: str = "local",
    attention: str = "sdpa",
    timeout: int = 1800,
) -> torch.Tensor:
    """Run :mod:`sfmed.convert.logits_worker` under ``torchrun`` (tp*pp processes) and return
    the logits it computed; raises RuntimeError with the workers' output on failure."""
    from sfmed.convert.mcore_to_hf import checkpoint_arch
    from sfmed.core.parallel import validate_parallel

    arch, _ = checkpoint_arch(ckpt)
    validate_parallel(arch, tp, pp)
    nproc = tp * pp
    if device == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError(
            f"parallel.tp*parallel.pp={nproc} processes need {nproc} GPUs; "
            f"{torch.cuda.device_count()} visible (use device=cpu or smaller tp/pp)"
        )
    with tempfile.TemporaryDirectory(prefix="sfmed-verify-") as tmp:
        tok_path, out_path = Path(tmp) / "tokens.pt", Path(tmp) / "logits.pt"
        torch.save(tokens.cpu(), tok_path)
        # One process needs no torchrun launcher (init_distributed sets up a world of one).
        launcher = [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
        cmd = [
            sys.executable,
            *(launcher if nproc > 1 else []),
            "-m",
            "sfmed.convert.logits_worker",
            "--ckpt",
            str(ckpt),
            "--tokens",
            str(tok_path),
            "--out",
            str(out_path),
            "--tp",
            str(tp),
            "--pp",
            str(pp),
            "--device",
            device,
            "--dtype",
            dtype_name(dtype),
            "--impl",
            impl,
            "--attention",
            attention,
        ]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]
        )
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU emulation refuses to run beside a GPU
        log.info("running %d megatron-core worker(s): tp=%d pp=%d on %s", nproc, tp, pp, device)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0 or not out_path.is_file():
            raise RuntimeError(
                f"megatron-core workers failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        return torch.load(out_path, weights_only=True)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_conversion`."""

    comparison: LogitsComparison
    tolerances: dict
    passed: bool

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        tol = ", ".join(f"{k}={v}" for k, v in self.tolerances.items())
        return f"{verdict}: {self.comparison.line()} (tolerances: {tol})"

    def to_json(self) -> str:
        return json.dumps(
            {**self.comparison.as_dict(), "tolerances": self.tolerances, "passed": self.passed}
        )


def verify_conversion(
    hf_dir: str | Path,
    ckpt: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    batch: int = 2,
    seq_length: int = 32,
    seed: int = 0,
    tolerances: dict | None = None,
    impl: str = "local",
    attention: str = "sdpa",
) -> VerifyResult:
    """Compare logits of ``hf_dir`` (transformers) and ``ckpt`` (megatron-core at tp×pp, built
    with training's layer spec: ``impl`` local|transformer_engine, ``attention``
    sdpa|flash|unfused for the local spec)."""
    from sfmed.convert.mcore_to_hf import checkpoint_arch
    from sfmed.models import arch_from_hf_config

    dev, compute_dtype = resolve_compute(device, dtype)
    hf_arch = arch_from_hf_config(hf_dir)
    arch, _ = checkpoint_arch(ckpt)
    if (hf_arch.num_layers, hf_arch.hidden_size, hf_arch.vocab_size) != (
        arch.num_layers,
        arch.hidden_size,
        arch.vocab_size,
    ):
        raise ConfigError(
            f"hf={hf_dir} ({hf_arch.num_layers} layers, hidden {hf_arch.hidden_size}, vocab "
            f"{hf_arch.vocab_size}) and mcore={ckpt} ({arch.num_layers}, {arch.hidden_size}, "
            f"{arch.vocab_size}) are different models"
        )
    if seq_length > arch.max_position_embeddings:
        raise ConfigError(
            f"seq_length={seq_length} exceeds max_position_embeddings="
            f"{arch.max_position_embeddings}"
        )
    tol = {**DEFAULT_TOLERANCES[compute_dtype], **(tolerances or {})}
    tokens = make_tokens(arch.vocab_size, batch, seq_length, seed)
    run = partial(
        run_mcore_logits,
        ckpt,
        tokens,
        tp=tp,
        pp=pp,
        device=dev,
        dtype=compute_dtype,
        impl=impl,
        attention=attention,
    )
    if model_bytes(arch, compute_dtype) > OVERLAP_MAX_BYTES:
        ref = hf_logits(hf_dir, tokens, compute_dtype, dev)  # one model in memory at a time
        got = run()
    else:  # small models: transformers computes while the workers start up
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(hf_logits, hf_dir, tokens, compute_dtype, dev)
            got = run()
            ref = pending.result()
    cmp = compare_logits(ref, got)
    return VerifyResult(cmp, tol, cmp.passes(**tol))
