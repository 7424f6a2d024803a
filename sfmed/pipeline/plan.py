"""The plan: for every stage, its command, its key, and whether it runs, resumes or is skipped
(and why), decided from the manifest and the outputs before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sfmed.config.pipeline import PipelineConfig, StageConfig
from sfmed.core.errors import UserError
from sfmed.pipeline.manifest import Manifest, fingerprint, stage_key
from sfmed.pipeline.stages import get_stage
from sfmed.pipeline.stages.base import StageContext, StageKind, Upstream

RUN, RESUME, RERUN, SKIP, EXCLUDED = "run", "resume", "rerun", "skip", "excluded"


@dataclass
class PlannedStage:
    """One stage of the plan."""

    name: str
    cfg: StageConfig
    kind: StageKind
    out: Path
    args: list[str]
    command: list[str]
    files: dict[Path, str]
    deps: list[str]
    inputs: dict[str, dict]
    external: dict[str, str]
    key: str
    action: str = RUN
    reason: str = ""
    discard: bool = False  # remove the stage's old output before it runs

    @property
    def runs(self) -> bool:
        """True when the stage does work in this invocation."""
        return self.action in (RUN, RESUME, RERUN)


@dataclass
class Plan:
    """The stages in run order and the notes printed before anything runs."""

    stages: list[PlannedStage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)

    def lines(self) -> list[str]:
        """The plan as printed: one line per stage, then the notes."""
        w = max(len(s.name) for s in self.stages)
        out = []
        for s in self.stages:
            proc = f" x{s.cfg.nproc_per_node}" if s.kind.training else ""
            desc = s.kind.describe(s.args)
            line = f"  {s.name:<{w}}  {s.kind.kind + proc:<13} {s.action:<8} {s.reason}"
            out.append(f"{line}  [{desc}]" if desc else line)
        return out + [f"  note: {n}" for n in self.notes]


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, item = ref.partition(":")
    return name, item or None


def _external(args: list[str], outs: list[Path], upstream_paths: set[str]) -> dict[str, str]:
    """Fingerprints of the existing paths the args name outside the pipeline's outputs
    (``outs``: the run folder and the stage's own output)."""
    found = {}
    roots = [o.resolve() for o in outs]
    for a in args:
        v = a.partition("=")[2].strip("'\"")
        if "/" not in v or v in upstream_paths or a.startswith("hydra."):
            continue
        p = Path(v)
        if not p.exists():
            continue
        rp = p.resolve()
        if not any(rp == r or r in rp.parents for r in roots):
            found[v] = fingerprint(p)
    return found


def _diff(old: list[str], new: list[str]) -> str:
    gone = [a for a in old if a not in new]
    added = [a for a in new if a not in old]
    parts = ([f"-{' -'.join(gone)}"] if gone else []) + ([f"+{' +'.join(added)}"] if added else [])
    return " ".join(parts)[:200]


def make_plan(cfg: PipelineConfig, manifest: Manifest) -> Plan:
    """Decide every stage's action; raise :class:`UserError` for what cannot run."""
    out_dir = Path(cfg.out_dir)
    selected = set(cfg.stages) if cfg.stages is not None else set(cfg.recipe.stages)
    plan = Plan()
    by_name: dict[str, PlannedStage] = {}
    for name, st in cfg.recipe.stages.items():
        kind = get_stage(st.kind)
        out = Path(st.output) if st.output else out_dir / name
        ctx = StageContext(name=name, cfg=st, out=out, device=cfg.device)
        for role, ref in st.inputs.items():
            up_name, item = _split_ref(ref)
            up = by_name[up_name]
            ctx.inputs[role] = (Upstream(up.name, up.kind, up.out, up.args), item)
        args = kind.args(ctx)
        files = kind.files(ctx)
        deps = list(dict.fromkeys([*(_split_ref(r)[0] for r in st.inputs.values()), *st.after]))
        inputs = {
            role: {"stage": up.name, "path": up.output(item), "key": by_name[up.name].key}
            for role, (up, item) in ctx.inputs.items()
        }
        external = _external(args, [out_dir, out], {i["path"] for i in inputs.values()})
        key = stage_key(
            {
                "kind": st.kind,
                "args": args,
                "nproc_per_node": st.nproc_per_node if kind.training else 1,
                "nodes": st.nodes if kind.training else 1,
                "files": {str(p): t for p, t in files.items()},
                "upstream": {d: by_name[d].key for d in deps},
                "external": external,
            }
        )
        ps = PlannedStage(
            name=name, cfg=st, kind=kind, out=out, args=args,
            command=kind.command(ctx, args), files=files, deps=deps, inputs=inputs,
            external=external, key=key,
        )  # fmt: skip
        _decide(ps, manifest.stages.get(name), by_name, name in selected)
        by_name[name] = ps
        plan.stages.append(ps)
    _check_subset(plan, by_name, selected)
    return plan


def _decide(ps: PlannedStage, rec: dict | None, by_name: dict, selected: bool) -> None:
    complete = ps.kind.is_complete(ps.out, ps.args)
    changed_up = [d for d in ps.deps if by_name[d].action in (RUN, RERUN) or by_name[d].discard]
    if rec and rec.get("key") == ps.key and not changed_up:
        if complete:
            ps.action = SKIP
            ps.reason = "complete; config and inputs unchanged"
            if rec.get("status") != "complete":
                ps.reason = f"complete (finished after the manifest said {rec.get('status')})"
            return
        status = rec.get("status", "?")
        if ps.kind.training and ps.out.is_dir():
            ps.action, ps.reason = RESUME, f"{status}; resumes from its last checkpoint"
        else:
            ps.action, ps.reason = RUN, f"{status}; runs again"
    elif rec:
        old = rec.get("config", {}).get("args", [])
        if changed_up:
            why = f"upstream {', '.join(changed_up)} reruns"
        elif old != ps.args:
            why = f"config changed ({_diff(old, ps.args)})"
        else:
            why = "inputs changed (" + ", ".join(
                k for k, v in ps.external.items() if rec.get("external", {}).get(k) != v
            ) + ")"  # fmt: skip
        ps.action, ps.reason = RERUN, f"{why}; its old output is discarded"
        ps.discard = ps.out.exists()
    else:
        ps.action, ps.reason = RUN, "new"
        if ps.out.exists() and any(ps.out.iterdir()):
            ps.discard = True
            ps.reason = "output without a manifest record; discarded and run again"
    if not selected:
        ps.action, ps.reason = EXCLUDED, f"not in stages= (would {ps.action}: {ps.reason})"
        ps.discard = False


def _check_subset(plan: Plan, by_name: dict, selected: set[str]) -> None:
    """Selected stages need their upstream stages complete (or selected too)."""
    problems = []
    for ps in plan.stages:
        if ps.name not in selected or not ps.runs:
            continue
        for d in ps.deps:
            up = by_name[d]
            if up.name not in selected and up.action == EXCLUDED:
                problems.append(
                    f"stage {ps.name} needs {d}, which is not complete and current ({up.reason}); "
                    f"add it to stages= or run the whole recipe"
                )
    stale_later = [
        s.name for s in plan.stages if s.action == EXCLUDED and s.deps
        and any(by_name[d].runs for d in s.deps)
    ]  # fmt: skip
    if stale_later:
        plan.notes.append(f"out of date after this run (not in stages=): {', '.join(stale_later)}")
    if problems:
        raise UserError("\n".join(problems))
