"""Benchmark: streaming conversion of a Qwen2-7B-shaped checkpoint, HF -> Megatron TP=2 x PP=2 ->
HF, against ``cp -r`` of the same folders on the same disk.

Targets (issue 2): peak RSS <= 3 GB and time <= 2x ``cp -r`` in each direction. The random HF
checkpoint is written tensor by tensor (never held in memory), each step runs in its own child
process, and its peak RSS comes from ``wait4`` of that child alone. Before each timed step
(copy or conversion) its input folder is dropped from the page cache, so both read from disk.

    python tests/benchmarks/bench_convert.py                 # full 7B shape (15.2 GB bf16)
    python tests/benchmarks/bench_convert.py --scale 0.25    # ~1.1 GB, a quick run

Needs about 3.3x the checkpoint size of free disk under --workdir (source, output, way back;
the ``cp`` copies are deleted right after they are timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

QWEN2_7B = dict(
    num_layers=28,
    hidden_size=3584,
    ffn_hidden_size=18944,
    num_attention_heads=28,
    num_query_groups=4,
    vocab_size=152064,
    kv_channels=128,
)


def shape_for(scale: float, layers: int | None) -> dict:
    """Qwen2-7B's shape, with hidden/ffn/vocab scaled by ``scale`` (bytes scale ~ scale^2)."""
    if scale == 1.0:
        s = dict(QWEN2_7B)
    else:
        hidden = max(512, round(QWEN2_7B["hidden_size"] * scale / 512) * 512)
        s = dict(
            QWEN2_7B,
            hidden_size=hidden,
            num_attention_heads=hidden // 128,
            ffn_hidden_size=max(128, round(QWEN2_7B["ffn_hidden_size"] * scale / 128) * 128),
            vocab_size=max(1000, round(QWEN2_7B["vocab_size"] * scale)),
        )
    if layers:
        s["num_layers"] = layers
    return s


def make_checkpoint(out: Path, shape: dict, seed: int = 0) -> int:
    """Write a random bf16 HF Qwen2 folder tensor by tensor (4 GB shards, like Qwen's)."""
    from sfmed.convert import keymap as km
    from sfmed.convert.hf_io import SafetensorsWriter
    from sfmed.models import ModelArch, get_family

    arch = ModelArch(
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        **shape,
    )
    specs = [
        (name, shp, torch.bfloat16)
        for m, layer in km.conversion_order(arch)
        for name, shp in zip(m.hf_names(layer), m.hf_shapes(arch))
    ]
    out.mkdir(parents=True)
    writer = SafetensorsWriter(out, specs, 4 * 10**9)
    g = torch.Generator().manual_seed(seed)
    for name, shp, dtype in specs:
        rows = max(1, (64 << 20) // (2 * (shp[1] if len(shp) > 1 else 1)))  # 64 MB blocks
        for start in range(0, shp[0], rows):
            n = min(rows, shp[0] - start)
            writer.write(name, torch.randn((n, *shp[1:]), generator=g).mul_(0.02).to(dtype))
    writer.close()
    (out / "config.json").write_text(
        json.dumps(get_family("qwen2").hf_config_dict(arch, "bfloat16"), indent=2)
    )
    return writer.total_bytes


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS of that child in GB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]}... failed with status {status}")
    return wall, usage.ru_maxrss * 1024 / 1e9


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (only these files: nobody else is affected),
    so that every timed step reads its input from the disk, the copy as much as the converter."""
    subprocess.run(["sync"], check=True)
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_cp(src: Path, work: Path) -> tuple[float, float]:
    """Seconds of ``cp -r`` and of the ``sync`` after it (the converter fsyncs its output, so
    cp + sync is the like-for-like baseline); the copy is deleted afterwards."""
    dst = work / f"{src.name}.cp"
    evict(src)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    t2 = time.perf_counter()
    shutil.rmtree(dst)
    return t1 - t0, t2 - t1


def check_exact(a: Path, b: Path) -> int:
    """Compare every tensor of two HF folders (streaming); return the number compared."""
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    wa, wb = where(a), where(b)
    assert sorted(wa) == sorted(wb), "tensor names differ"
    for name in wa:
        with safe_open(str(wa[name]), "pt") as fa, safe_open(str(wb[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    return len(wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", default="outputs/bench_convert")
    ap.add_argument("--scale", type=float, default=1.0, help="hidden/ffn/vocab factor (1 = 7B)")
    ap.add_argument("--layers", type=int, default=None, help="override the 28 layers")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--no-check", action="store_true", help="skip the bit-exactness check")
    ap.add_argument("--keep", action="store_true", help="keep the folders afterwards")
    args = ap.parse_args()

    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shape = shape_for(args.scale, args.layers)
    hf, mc, back = work / "hf", work / "mcore", work / "hf_back"
    t0 = time.perf_counter()
    size = make_checkpoint(hf, shape)
    print(
        f"made random Qwen2 {shape} bf16: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )

    py = [sys.executable, "-c"]
    to_mcore = (
        "import logging,sys; logging.basicConfig(level=logging.INFO);"
        "from sfmed.convert import convert_hf_to_mcore as c;"
        f"c({str(hf)!r}, {str(mc)!r}, tp={args.tp}, pp={args.pp}, progress=False)"
    )
    to_hf = (
        "import logging,sys; logging.basicConfig(level=logging.INFO);"
        "from sfmed.convert import convert_mcore_to_hf as c;"
        f"c({str(mc)!r}, {str(back)!r}, progress=False)"
    )
    rows = []
    cp_hf = timed_cp(hf, work)
    evict(hf)
    t, rss = run_child(py + [to_mcore])
    rows.append(("hf->mcore", size, t, rss, cp_hf))
    cp_mc = timed_cp(mc, work)
    evict(mc)
    t, rss = run_child(py + [to_hf])
    rows.append(("mcore->hf", folder_bytes(mc), t, rss, cp_mc))
    checked = None if args.no_check else check_exact(hf, back)

    print(
        f"\nconversion of a {size / 1e9:.2f} GB bf16 checkpoint, tp={args.tp} pp={args.pp}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'direction':<10} {'GB':>6} {'convert s':>10} {'cp -r s':>8} {'+sync s':>8} "
        f"{'ratio':>6} {'ratio to cp only':>17} {'peak RSS GB':>12}"
    )
    for name, nbytes, t, rss, (cp, sync) in rows:
        print(
            f"{name:<10} {nbytes / 1e9:>6.2f} {t:>10.1f} {cp:>8.1f} {sync:>8.1f} "
            f"{t / (cp + sync):>6.2f} {t / cp:>17.2f} {rss:>12.2f}"
        )
    if checked is not None:
        print(f"round trip bit-exact: {checked} tensors compared")
    ok = all(t / sum(cp) <= 2.0 and rss <= 3.0 for _, _, t, rss, cp in rows)
    print("targets (time <= 2x cp -r + sync, peak RSS <= 3 GB):", "met" if ok else "NOT met")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
