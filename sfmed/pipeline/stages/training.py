"""``pretrain``, ``sft``, ``dpo``: the shared trainer's stages (``torchrun launch/<kind>.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from sfmed.pipeline.stages import register_stage
from sfmed.pipeline.stages.base import StageContext, StageKind, read_json

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


class TrainingStage(StageKind):
    """Input roles ``init_from`` (a checkpoint) and ``data`` (a dataset prefix).

    Runs with ``resume=auto``: an interrupted stage continues from its last checkpoint.
    """

    training = True
    roles = {"init_from": "init_from", "data": "data.prefix"}

    def __init__(self, kind: str):
        self.kind = kind
        self.entry = f"launch/{kind}.py"
        self.config_name = kind
        self.schema = SCHEMAS[kind]

    def owned_args(self, ctx: StageContext) -> list[str]:
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
