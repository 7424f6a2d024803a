"""Build what trains: model chunks wrapped in megatron DDP, the optimizer and the LR schedule.

This is where the parallelism is applied, in one place (torchtitan's rule): the
``TransformerConfig`` gets TP/PP/VPP/SP/CP, recompute and precision settings from the plan, each
virtual pipeline stage becomes one ``GPTModel`` chunk, every chunk is wrapped in megatron-core's
``DistributedDataParallel``, and ``get_megatron_optimizer`` builds AdamW (distributed optimizer,
fp32 master weights) over all chunks.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from sfmed.config.run import RunConfig
from sfmed.core.mcore_compat import fix_torch_adam_loading
from sfmed.models import build_model, decoder_layer_spec, transformer_config
from sfmed.train.plan import TrainPlan

log = logging.getLogger(__name__)


def use_grad_accum_fusion(plan: TrainPlan) -> bool:
    """Whether to fuse weight-gradient accumulation into the GEMMs (logged either way).

    Only on CUDA and only when apex's ``fused_weight_gradient_mlp_cuda`` imports: megatron's
    ``ColumnParallelLinear`` output layer raises at model build without it, TE or not.
    """
    if plan.device != "cuda":
        return False
    from sfmed.models.specs import grad_accum_fusion_available

    if grad_accum_fusion_available():
        log.info("gradient_accumulation_fusion: on (fused_weight_gradient_mlp_cuda imports)")
        return True
    log.info(
        "gradient_accumulation_fusion: off (apex's fused_weight_gradient_mlp_cuda extension "
        "is not importable; install apex with --cuda_ext to enable it)"
    )
    return False


def make_transformer_config(cfg: RunConfig, plan: TrainPlan):
    """megatron-core ``TransformerConfig`` for this run (parallelism, precision, recompute)."""
    p, t = cfg.parallel, cfg.train
    cuda = plan.device == "cuda"
    te = plan.impl == "transformer_engine"
    kw = dict(
        sequence_parallel=plan.sequence_parallel,
        context_parallel_size=p.cp,
        virtual_pipeline_model_parallel_size=plan.vpp,
        calculate_per_token_loss=True,
        # Interleaved schedule: Megatron-LM's defaults. Batched p2p would post a rank's sends to
        # the same peer in both directions (pp=2 wraps around) in an order that pairs them with
        # the wrong receives; the overlapped path splits the directions over two groups.
        overlap_p2p_comm=plan.vpp is not None,
        batch_p2p_comm=plan.vpp is None,
        # Frees stage outputs once sent: safe with NCCL's stream ordering, but a gloo isend
        # still reads the buffer after the schedule frees it (corrupted activations on CPU).
        deallocate_pipeline_outputs=cuda,
        use_cpu_initialization=not cuda,
        # Always initialise, even when weights are loaded next: megatron's parallel linears set
        # their tensor-parallel attributes inside the init functions, and without them the
        # gradient norm counts TP-sharded weights as duplicates (wrong clipping).
        perform_initialization=True,
        # Fused kernels exist only on GPU; apex is never required (TE or plain PyTorch).
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        apply_rope_fusion=cuda and te,
        gradient_accumulation_fusion=use_grad_accum_fusion(plan),
        cross_entropy_loss_fusion=cuda,
        cross_entropy_fusion_impl="native",
    )
    if p.recompute_granularity is not None:
        kw["recompute_granularity"] = p.recompute_granularity
        if p.recompute_granularity == "full":
            kw["recompute_method"] = p.recompute_method
            kw["recompute_num_layers"] = p.recompute_num_layers
        else:
            kw["recompute_modules"] = list(p.recompute_modules)
    if plan.precision == "fp8":
        kw.update(
            fp8=t.fp8_format,
            fp8_recipe=t.fp8_recipe,
            fp8_amax_history_len=t.fp8_amax_history_len,
            fp8_amax_compute_algo=t.fp8_amax_compute_algo,
            fp8_param=t.fp8_param_gather,
        )
    return transformer_config(plan.arch, tp=p.tp, pp=p.pp, params_dtype=plan.params_dtype, **kw)


def build_model_chunks(cfg: RunConfig, plan: TrainPlan, tf_config) -> list[torch.nn.Module]:
    """This rank's GPTModel chunk(s) (one per virtual pipeline stage), on the device."""
    from megatron.core import parallel_state as ps

    # The model's vocabulary is the (checkpoint's) padded size; divisible_by=1 keeps it as is.
    arch = dataclasses.replace(plan.arch, vocab_size=plan.padded_vocab_size)
    chunks = []
    for vp in range(plan.vpp or 1):
        vp_stage = vp if plan.vpp else None
        chunk = build_model(
            arch,
            tf_config,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            spec=decoder_layer_spec(tf_config, plan.impl, plan.attention, vp_stage=vp_stage),
            vp_stage=vp_stage,
            max_sequence_length=max(plan.seq_length, plan.arch.max_position_embeddings),
            make_vocab_size_divisible_by=1,
        )
        chunks.append(chunk)
    if plan.device == "cuda":
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    n = sum(p.numel() for c in chunks for p in c.parameters())
    log.info("model chunk(s) on this rank: %d, %.2fM parameters", len(chunks), n / 1e6)
    return chunks


def wrap_ddp(cfg: RunConfig, tf_config, chunks: list[torch.nn.Module]):
    """Wrap each chunk in megatron-core DDP (fp32 grad buffers, optional overlap)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    p = cfg.parallel
    ddp_kw = dict(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # NaN/Inf are handled by sfmed's loss guard (skip or stop), not by an exception here.
        check_for_nan_in_grad=False,
        average_in_collective=False,
    )
    if p.bucket_size is not None:
        ddp_kw["bucket_size"] = p.bucket_size
    if cfg.train.precision == "fp8" and cfg.train.fp8_param_gather:
        ddp_kw["fp8_param_gather"] = True
    ddp_config = DistributedDataParallelConfig(**ddp_kw)
    return [
        DistributedDataParallel(
            config=tf_config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buckets overlap with compute (Megatron-LM's choice).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(cfg: RunConfig, plan: TrainPlan, model: list):
    """AdamW (megatron-core optimizer, fp32 master weights) and its LR/WD schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    ocfg = OptimizerConfig(
        optimizer="adam",
        decoupled_weight_decay=True,  # AdamW
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=plan.precision in ("bf16", "fp8"),
        fp16=plan.precision == "fp16",
        params_dtype=plan.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        fp8_recipe=cfg.train.fp8_recipe if plan.precision == "fp8" else None,
    )
    optimizer = get_megatron_optimizer(ocfg, model)
    fix_torch_adam_loading(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=plan.warmup_steps,
        lr_decay_steps=plan.decay_steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.steps,
        wd_incr_style="constant",
        # The config wins over the checkpoint's schedule values on resume (LR can be changed).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=o.wsd_decay_steps,
        lr_wsd_decay_style="linear",
    )
    return optimizer, scheduler


def configure_schedule_hooks(tf_config, model: list, optimizer) -> None:
    """Hooks megatron's pipeline schedules call: grad sync overlap, loss scaling, finalise."""
    from megatron.core.distributed import finalize_model_grads

    tf_config.grad_scale_func = optimizer.scale_loss
    tf_config.finalize_model_grads_func = finalize_model_grads
    ddp = model[0].ddp_config
    if ddp.overlap_grad_reduce:
        fns = [m.no_sync for m in model]
        tf_config.no_sync_func = fns[0] if len(fns) == 1 else fns
        tf_config.grad_sync_func = [m.start_grad_sync for m in model]
        if len(model) == 1:
            tf_config.grad_sync_func = tf_config.grad_sync_func[0]
    if ddp.overlap_param_gather:
        tf_config.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            tf_config.param_sync_func = tf_config.param_sync_func[0]
