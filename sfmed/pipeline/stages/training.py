"""``pretrain``, ``sft``, ``dpo``: the shared trainer's stages (``torchrun launch/<kind>.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from sfmed.core.errors import ConfigError
from sfmed.pipeline.stages import register_stage
from sfmed.pipeline.stages.base import StageContext, StageKind, arg_value, read_json

HF_EXPORTS = ("hf", "merged", "adapter")  # what an engine=hf run writes (docs/sft.md)
SCHEMAS = {
    "pretrain": "sfmed.config.pretrain:PretrainConfig",
    "sft": "sfmed.config.sft:SFTConfig",
    "dpo": "sfmed.config.dpo:DPOConfig",
}


def read_metrics(out: Path) -> list[dict]:
    """The training rows (with a loss) of ``<run>/metrics.jsonl``, last record per step."""
    rows: dict[int, dict] = {}
    try:
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if "loss" in r and "step" in r:
            rows[r["step"]] = r  # a resumed run logs the steps after its checkpoint again
    return [rows[s] for s in sorted(rows)]


def engine(args: list[str]) -> str:
    """The stage's training engine (``engine=`` in its args; the entry's default ``mcore``)."""
    return arg_value(args, "engine") or "mcore"


def hf_export(args: list[str]) -> str | None:
    """The model folder an ``engine=hf`` run leaves for later stages: ``hf`` (full-parameter)
    or ``merged`` (LoRA with ``hf.export=merged|both``); None when it writes only an adapter."""
    if (arg_value(args, "hf.lora.enabled") or "false").lower() != "true":
        return "hf"
    return None if arg_value(args, "hf.export") == "adapter" else "merged"


class TrainingStage(StageKind):
    """Input roles ``init_from`` (a checkpoint), ``model`` (an HF folder, ``engine=hf``) and
    ``data`` (a dataset prefix).

    Runs with ``resume=auto``: an interrupted stage continues from its last checkpoint. An
    ``engine=hf`` stage gives later stages its exported HF folder (``hf/`` or ``merged/``;
    items ``:hf``, ``:merged``, ``:adapter`` name one); an ``engine=mcore`` stage its run folder.
    """

    training = True
    roles = {"init_from": "init_from", "model": "hf.model", "data": "data.prefix"}

    def __init__(self, kind: str):
        self.kind = kind
        self.entry = f"launch/{kind}.py"
        self.config_name = kind
        self.schema = SCHEMAS[kind]

    def owned_args(self, ctx: StageContext) -> list[str]:
        eng = engine([*ctx.cfg.args, *ctx.cfg.extra_args])
        # Each engine starts from its own kind of model: refuse the other's role by name.
        wrong = {"hf": "init_from", "mcore": "model"}.get(eng)
        if wrong in ctx.cfg.inputs:
            fix = (
                "inputs.model=<an HF folder stage> (engine=hf trains an HF folder)"
                if eng == "hf"
                else "inputs.init_from=<a checkpoint stage>, or engine=hf in its args"
            )
            raise ConfigError(
                f"recipe.stages.{ctx.name}.inputs.{wrong}: an engine={eng} stage does not take "
                f"{wrong!r}; use {fix}"
            )
        own = [f"ckpt_dir={ctx.out}", "resume=auto"]
        for role, key in self.roles.items():
            if ctx.input(role):
                own.append(f"{key}={ctx.input(role)}")
        return own

    def local_prefix(self, nproc_per_node: int) -> list[str]:
        from sfmed.core.ports import free_port

        return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip

    def is_complete(self, out: Path, args: list[str]) -> bool:
        status = read_json(out / "status.json") or {}
        return status.get("status") == "complete"

    def describe(self, args: list[str]) -> str:
        if engine(args) != "hf":
            return "engine=mcore"
        lora = (arg_value(args, "hf.lora.enabled") or "false").lower() == "true"
        return "engine=hf, LoRA" if lora else "engine=hf, full-parameter"

    def output(self, out: Path, args: list[str], item: str | None) -> str:
        if engine(args) != "hf":
            return super().output(out, args, item)
        item = item or hf_export(args)
        if item is None:
            raise ConfigError(
                f"this engine=hf {self.kind} stage writes only a LoRA adapter (hf.export=adapter), "
                "and a later stage needs a model folder: set hf.export=merged or both, or take "
                "'<stage>:adapter'"
            )
        if item not in HF_EXPORTS:
            raise ConfigError(
                f"an engine=hf {self.kind} stage gives {list(HF_EXPORTS)} (its HF exports); "
                f"not ':{item}'"
            )
        return str(out / item)

    def result(self, out: Path, args: list[str]) -> dict:
        rows = read_metrics(out)
        if not rows:
            return {}
        last = rows[-1]
        keep = ("step", "loss", "grad_norm", "tokens_per_s", "mfu")
        res = {k: last[k] for k in keep if k in last}
        res.update({k: v for k, v in last.items() if k.startswith(("reward", "accuracy"))})
        res["first_loss"] = rows[0]["loss"]
        return res


for _kind in ("pretrain", "sft", "dpo"):
    register_stage(TrainingStage(_kind))
