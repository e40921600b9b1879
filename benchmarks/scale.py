"""Scale: random Llama models of 0.5 B and 1.5 B parameters with 4 experts, per tier, against mergekit-yaml.

Models are built from a config with random weights (nothing downloaded) and saved as bf16 safetensors
under ``--work`` (default /work/scratch/scale): the base (init std 0.02) and 4 experts = base + seeded
Gaussian noise (σ = 1e-3), rounded to bf16 when saved. Every τ is a difference of two bf16 numbers,
so |τ| ties heavily, as in real checkpoints. Shapes (Llama layout, tied embeddings):

- ``0.5b``: Qwen2.5-0.5B's shape (hidden 896, 24 layers, MLP 4864, 14 heads / 2 KV heads, vocab 151936);
- ``1.5b``: Qwen2.5-1.5B's shape (hidden 1536, 28 layers, MLP 8960, 12 heads / 2 KV heads, vocab 151936);
- ``tiny``: a smoke size (hidden 256, 4 layers) to check the script.

Per size, in one process (one ``--threads``; ``--kernels``: compiled, the engine's default, or eager;
bf16 store): for each tier (``device``; on a CPU merge device ``host`` is the same memory, so it is not
run twice; ``disk``: memory-mapped file, forced by a budget smaller than the store), load time and peak
RSS, store bytes, then per method the kernels' compilation (compiled only), the first candidate (setup)
and the median of the next ``--reps`` candidates, with the peak RSS of each. The disk tier is compared
with the fastest of three cold-ish sequential reads of its file (``read()`` and a map, pages dropped from
the page cache with ``posix_fadvise(DONTNEED)`` first; direct I/O), taken just before and just after each
method's candidates (this machine's disk speed drifts by up to 2× within minutes; the mean of the two is
the reference); its candidates are timed cold-ish too (the store's pages released from the map and
dropped before each one, as a store larger than the RAM would be read). Then
``mergetune merge`` and ``mergekit-yaml`` one-shot on the same folders (TA, TIES with mergekit's rules,
DARE), wall time and peak RSS (``/usr/bin/time``).
Finally a projection for 7B / 70B with 4 and 8 experts on one and eight 141 GB GPUs, from the
measured bytes per parameter and stated (assumed, not measured) bandwidths.

Results are appended to ``benchmarks/results/scale.md`` (``--sizes`` runs sizes separately).

Usage: python benchmarks/scale.py [--sizes 0.5b,1.5b] [--reps 2] [--threads 2] [--methods ...] [--no-mergekit]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from merge_speed import peak_rss_bytes, peak_rss_reset
from oneshot import MERGEKIT_TIES, max_difference
from oneshot import timed as timed_command
from safetensors.torch import save_file
from thresholds import KERNELS, candidates, time_candidates, use_compile
from transformers import LlamaConfig, LlamaForCausalLM

from mergetune.export.mergekit import export_mergekit
from mergetune.merging.methods import parse_recipe
from mergetune.merging.modelset import ModelSet
from mergetune.merging.residency import MemoryBudget

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "scale.md"
SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab
    "tiny": (256, 4, 688, 4, 2, 32000),
    "0.5b": (896, 24, 4864, 14, 2, 151936),
    "1.5b": (1536, 28, 8960, 12, 2, 151936),
}
N_EXPERTS = 4
NOISE = 1e-3
METHODS = {  # label -> (method, options)
    "ta": ("task_arithmetic", {}),
    "ties (global)": ("ties", {"scope": "global"}),
    "ties (tensor)": ("ties", {"scope": "tensor"}),
    "breadcrumbs (row)": ("breadcrumbs", {"scope": "row"}),
    "dare": ("dare_linear", {}),
    "pcb": ("pcb", {"scope": "global"}),
}
TARGET_3X = ("ties", "breadcrumbs", "pcb")
ONESHOT = {
    "ta": {"method": "task_arithmetic", "weight": 0.3},
    "ties": {"method": "ties", "weight": 1.0, "density": 0.2, "options": MERGEKIT_TIES},
    "dare": {"method": "dare_linear", "weight": 0.3, "density": 0.5, "seed": 1},
}
# Projection assumptions (stated, not measured here)
GPU_BYTES = 141e9
HBM_BW, PCIE_BW, NVME_BW = 4.8e12, 50e9, 7e9
HOST_BYTES = 2e12  # an 8×H200 node's host RAM (DGX H200: 2 TB)
HEADROOM = 0.10  # of each GPU kept for activations and the merge's chunk buffers
EVAL_BYTES_PER_PARAM = 2.0  # the evaluation model in bf16 (the merged weights it holds)

out_lines: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    out_lines.append(line)


# ---- inputs ---------------------------------------------------------------------------------------------
def llama_config(size: str) -> LlamaConfig:
    hidden, layers, inter, heads, kv, vocab = SHAPES[size]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],  # mergekit reads the architecture from the config
    )


def build_models(size: str, root: Path) -> tuple[Path, dict[str, Path], int]:
    """Base and experts as bf16 safetensors folders (built once; a folder counts when its weights exist)."""
    config = llama_config(size)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    n_params = sum(s.numel() for s in shapes.values())
    base, experts = root / "base", {f"task{t}": root / f"task{t}" for t in range(N_EXPERTS)}
    if all((f / "model.safetensors").is_file() for f in (base, *experts.values())):
        return base, experts, n_params
    gen = torch.Generator().manual_seed(0)
    # norms at 1 as Llama initialises them; everything else N(0, 0.02), Llama's initializer_range
    state = {
        k: torch.ones(s) if k.endswith("norm.weight") else 0.02 * torch.randn(s, generator=gen)
        for k, s in shapes.items()
    }
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    _write(config, state, base)
    for t, (_name, folder) in enumerate(experts.items()):
        noise = torch.Generator().manual_seed(1000 + t)
        _write(
            config,
            {
                k: (v.float() + NOISE * torch.randn(v.shape, generator=noise)).to(torch.bfloat16)
                for k, v in state.items()
            },
            folder,
        )
    return base, experts, n_params


def _write(config: LlamaConfig, state: dict[str, torch.Tensor], dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


# ---- in-process: load, tiers, per-candidate merges ----------------------------------------------------------
MADV_DONTNEED = 4  # Linux <sys/mman.h>


def drop_cached_pages(path: Path, mapped: torch.Tensor | None = None) -> None:
    """Drop a file's pages from the page cache, as cold as a non-root user can make it.

    The page cache keeps a page that a process maps, so ``mapped`` (a tensor over this process's map
    of the whole file) is first released from the map with ``madvise(MADV_DONTNEED)``: a read-only
    file map reloads its pages from the file on the next access, so nothing is lost.
    """
    if mapped is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        start = ctypes.c_void_p(mapped.untyped_storage().data_ptr())
        if libc.madvise(start, ctypes.c_size_t(path.stat().st_size), MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), f"madvise on the map of {path}")
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cold_read_seconds(path: Path) -> float:
    """Sequential read of a file after dropping its pages from the page cache."""
    drop_cached_pages(path)
    buf = bytearray(64 << 20)  # one buffer: a fresh one per read would time its page faults, not the disk
    with open(path, "rb", buffering=0) as f:
        start = time.perf_counter()
        while f.readinto(buf):
            pass
        return time.perf_counter() - start


def direct_read_seconds(path: Path) -> float:
    """A sequential read of the file with direct I/O (``O_DIRECT``, 32 MiB requests into one aligned buffer):
    the way the disk tier's reader reads it, without the page cache (nothing to drop first)."""
    import mmap

    buffer = mmap.mmap(-1, 32 << 20)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        start, offset = time.perf_counter(), 0
        while (n := os.preadv(fd, [buffer], offset)) > 0:
            offset += n
        return time.perf_counter() - start
    finally:
        os.close(fd)
        buffer.close()


def read_reference(path: Path, mapped: torch.Tensor) -> dict[str, float]:
    """The store read cold three ways (``read()``, through a map, direct I/O); ``read``: the fastest."""
    times = {"read_call": cold_read_seconds(path), "read_map": mapped_read_seconds(path, mapped)}
    if hasattr(os, "O_DIRECT"):
        times["read_direct"] = direct_read_seconds(path)
    return {**times, "read": min(times.values())}


def mapped_read_seconds(path: Path, mapped: torch.Tensor) -> float:
    """A cold pass over the whole file through a map of its own (page faults with the kernel's readahead),
    the way a merge reads a disk store; faster than ``read()`` into a buffer on this machine."""
    drop_cached_pages(path, mapped)
    with warnings.catch_warnings():  # read-only map: only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r"))
    step = 256 << 20
    start = time.perf_counter()
    for a in range(0, data.numel(), step):
        part = data[a : a + step]
        (part.view(torch.int64) if part.numel() % 8 == 0 else part).sum()  # touch every byte
    seconds = time.perf_counter() - start
    drop_cached_pages(path, data)
    return seconds


def measure_tier(tier: str, base: Path, experts: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    gc.collect()
    peak_rss_reset()
    start = time.perf_counter()
    budget = MemoryBudget(memory=1, disk_dir=str(work / "store")) if tier == "disk" else MemoryBudget()
    ms = ModelSet.load(str(base), {t: str(p) for t, p in experts.items()}, storage_dtype=torch.bfloat16, budget=budget)
    row = {"load": time.perf_counter() - start, "load_peak": peak_rss_bytes(), "store": ms.resident_bytes()}
    row["tier"] = ms.residency.tier
    row["numel"] = ms.numel
    drop_pages = lambda: None  # noqa: E731
    reference: Callable[[], dict[str, float]] = dict
    if tier == "disk":
        path = Path(ms.residency.path)
        reference = partial(read_reference, path, ms.tau)
        row.update(reference())  # the target's reference: the fastest way to read it
        # every timed candidate starts with the store's pages out of the page cache, as a store larger than
        # the RAM would be read: a candidate's time is then compared with a cold read of the file
        drop_pages = partial(drop_cached_pages, path, ms.tau)
    row["methods"] = {}
    for label in args.methods:
        method, options = METHODS[label]
        recipes = candidates(ms, method, options, args.reps + 1, seed=7)
        before = reference()
        row["methods"][label] = m = time_candidates(ms, recipes, args.compile, before_each=drop_pages)
        if before:  # this disk's speed drifts by 2× within minutes: the reads just before and after the candidates
            after = reference()
            m["read"], m["read_around"] = (before["read"] + after["read"]) / 2, (before["read"], after["read"])
        print(f"  [{tier}] {label}: setup {m['setup']:.2f} s, per {m['per']:.2f} s", flush=True)
    if tier == "disk":
        shutil.rmtree(work / "store", ignore_errors=True)
    del ms
    gc.collect()
    return row


# ---- one-shot against mergekit-yaml -------------------------------------------------------------------------
def oneshot(base: Path, experts: dict[str, Path], work: Path, threads: int) -> list[tuple]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["COLUMNS"], env["OMP_NUM_THREADS"] = "400", str(threads)
    mergekit_yaml = str(Path(sys.executable).with_name("mergekit-yaml"))
    listed = [{"name": t, "model": str(p)} for t, p in experts.items()]
    rows = []
    for name, spec in ONESHOT.items():
        recipe = parse_recipe({"base": str(base), "experts": listed, "dtype": "bfloat16", **spec})
        exported = export_mergekit(recipe, approximate=True)
        run = work / "oneshot" / name
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        recipe.save(run / "recipe.yaml")
        (run / "mergekit.yaml").write_text(exported.yaml)
        ours = [sys.executable, "-c", "from mergetune.cli import app; app()", "merge", str(run / "recipe.yaml")]
        ours += [str(run / "mergetune"), "--engine", "eager", "--threads", str(threads)]
        theirs = [mergekit_yaml, str(run / "mergekit.yaml"), str(run / "mergekit"), "--lazy-unpickle"]
        a, b = timed_command(ours, env), timed_command(theirs, env)
        diff = max_difference(run / "mergetune", run / "mergekit")
        rows.append((name, exported.faithful, a, b, diff))
        print(
            f"  one-shot {name}: mergetune {a[0]:.1f} s {a[1]:.2f} GB | mergekit {b[0]:.1f} s {b[1]:.2f} GB", flush=True
        )
        shutil.rmtree(run, ignore_errors=True)
    return rows


# ---- report ---------------------------------------------------------------------------------------------------
def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def report_size(
    size: str, n_params: int, build_s: float, tiers: dict[str, dict], shots: list[tuple], kernels: str
) -> None:
    hidden, layers, inter, heads, kv, vocab = SHAPES[size]
    store = next(iter(tiers.values()))["store"]
    emit(f"\n### {size}: {n_params / 1e9:.3f} B parameters, {N_EXPERTS} experts\n")
    emit(
        f"Llama, hidden {hidden}, {layers} layers, MLP {inter}, {heads} heads / {kv} KV, vocab {vocab}, tied "
        "embeddings; "
        f"bf16 files ({gb(2 * n_params)} each, built in {build_s:.0f} s), bf16 store {gb(store)} "
        f"({store / n_params:.2f} bytes per parameter = {N_EXPERTS} task vectors + base). "
        f"Load avg at end: {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}; {kernels} kernels; CPU.\n"
    )
    emit("| tier | load s | load peak RSS | store bytes | cold read of the store s: read() / map / direct I/O |")
    emit("|---|---|---|---|---|")
    for r in tiers.values():
        reads = [f"{r[k]:.1f}" for k in ("read_call", "read_map", "read_direct") if k in r]
        read = " / ".join(reads) or "-"
        emit(f"| {r['tier']} | {r['load']:.1f} | {gb(r['load_peak'])} | {gb(r['store'])} | {read} |")
    emit("\n(On a CPU merge device the host tier is the device tier: same memory, not run twice.)\n")
    emit(
        "| tier | method | compile + first s | first candidate s | per candidate s | ×TA | setup/cand "
        "| peak RSS setup | peak RSS per cand |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    for r in tiers.values():
        ta = r["methods"].get("ta", {}).get("per")
        for label, m in r["methods"].items():
            x_ta = f"{m['per'] / ta:.2f}" if ta else "-"
            compiling = "-" if math.isnan(m.get("compile_setup", math.nan)) else f"{m['compile_setup']:.2f}"
            emit(
                f"| {r['tier']} | {label} | {compiling} | {m['setup']:.2f} | {m['per']:.2f} | {x_ta} "
                f"| {m['setup'] / m['per']:.1f} "
                f"| {gb(m['setup_peak'])} | {gb(m['peak'])} |"
            )
    emit("\nTargets:")
    for r in tiers.values():
        ta = r["methods"].get("ta", {}).get("per")
        for label, m in r["methods"].items():
            ratio = m["setup"] / m["per"]
            verdict = "met" if ratio <= 10 else "MISSED"
            emit(f"- [{r['tier']}] {label}: setup ≤ 10× one candidate: {ratio:.1f}× -> {verdict}")
            if ta and label.startswith(TARGET_3X):
                x = m["per"] / ta
                emit(f"- [{r['tier']}] {label}: per candidate ≤ 3× TA: {x:.2f}× -> {'met' if x <= 3 else 'MISSED'}")
            if r["tier"] == "disk":
                read = m.get("read", r["read"])
                around = " (fastest cold read before / after: {:.1f} / {:.1f} s)".format(*m["read_around"])
                x = m["per"] / read
                verdict = "met" if x <= 1.5 else "MISSED"
                emit(
                    f"- [disk] {label}: per candidate ≤ 1.5× the fastest cold read around it: {x:.2f}× -> {verdict}"
                    + (around if "read_around" in m else "")
                )
    if shots:
        emit("\nOne-shot, same bf16 folders (`mergetune merge --engine eager` vs `mergekit-yaml --lazy-unpickle`):\n")
        emit(
            "| merge | export | mergetune wall | mergekit wall | ratio | mergetune peak RSS | mergekit peak RSS "
            "| ratio | max abs diff |"
        )
        emit("|---|---|---|---|---|---|---|---|---|")
        for name, faithful, a, b, diff in shots:
            emit(
                f"| {name} | {faithful} | {a[0]:.1f} s | {b[0]:.1f} s | {a[0] / b[0]:.2f}× | {a[1]:.2f} GB "
                f"| {b[1]:.2f} GB | {a[1] / b[1]:.2f}× | {diff:.3g} |"
            )
        for name, _f, a, b, _d in shots:
            wall, rss = a[0] <= 0.5 * b[0], a[1] <= b[1]
            emit(
                f"- one-shot {name}: wall ≤ 0.5× mergekit {'met' if wall else 'MISSED'} ({a[0] / b[0]:.2f}×), "
                f"peak RSS ≤ mergekit {'met' if rss else 'MISSED'} ({a[1] / b[1]:.2f}×)"
            )


def projection(n_params: int, tiers: dict[str, dict]) -> None:
    """7B / 70B, 4 and 8 experts, one and eight 141 GB GPUs: bytes per parameter from the measured run."""
    device = tiers.get("device") or next(iter(tiers.values()))
    per_param_store = device["store"] / n_params / (N_EXPERTS + 1)  # one bf16 slot (base or one τ)
    measured_output = max(m["output"] for m in device["methods"].values()) / n_params  # float32 merged weights here
    output = EVAL_BYTES_PER_PARAM
    emit("\n### Projection (7B / 70B)\n")
    emit(
        f"Measured: {per_param_store:.2f} bytes per parameter per store slot (bf16; T task vectors + base = T + 1 "
        f"slots); merged weights measured at {measured_output:.2f} bytes per parameter (float32 output), projected "
        f"with a bf16 evaluation model ({output:.2f}: recipe dtype bfloat16). Device need = "
        f"(T + 1)·{per_param_store:.2f} + {output:.2f} bytes per parameter, plus activations (not counted). "
        f"Assumed (not measured): {GPU_BYTES / 1e9:.0f} GB per H200, HBM {HBM_BW / 1e12:.1f} TB/s, PCIe 5 host→device "
        f"{PCIE_BW / 1e9:.0f} GB/s per GPU, NVMe {NVME_BW / 1e9:.0f} GB/s, {HOST_BYTES / 1e12:.0f} TB host RAM; "
        "a merge reads the store once (TA; TIES/PCB measured above at their ×TA). 8 GPUs: the store split by layer "
        "groups along the device map, each GPU merging its share in parallel; 10% of each GPU is kept "
        "for activations and chunk buffers.\n"
    )
    emit("| model | experts | GPUs | store | store + eval model | tier | per candidate (store read) |")
    emit("|---|---|---|---|---|---|---|")
    for p in (7e9, 70e9):
        for t in (4, 8):
            store = (t + 1) * per_param_store * p
            need = store + output * p
            for gpus in (1, 8):
                room = gpus * GPU_BYTES * (1 - HEADROOM)
                if need <= room:
                    tier, time_s = "device", f"{store / gpus / HBM_BW * 1e3:.0f} ms"
                elif output * p > room:
                    tier, time_s = "does not fit (the evaluation model alone)", "-"
                elif store <= HOST_BYTES:
                    tier, time_s = "host (pinned, streamed)", f"{store / gpus / PCIE_BW:.1f} s"
                else:
                    tier, time_s = "disk (NVMe)", f"{store / NVME_BW:.0f} s"
                emit(f"| {p / 1e9:.0f}B | {t} | {gpus} | {gb(store)} | {gb(need)} | {tier} | {time_s} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5b,1.5b")
    parser.add_argument("--tiers", default="device,disk", help="device and/or disk (host = device on CPU)")
    parser.add_argument("--reps", type=int, default=2, help="candidates timed after the first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", choices=KERNELS, default="compiled", help="as the engine's default, or eager")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--work", default="/work/scratch/scale")
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m in METHODS]
    torch.set_num_threads(args.threads)
    args.compile = use_compile(args.kernels)
    emit(f"\n## Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, sizes {args.sizes}, torch {torch.__version__}")
    for size in args.sizes.split(","):
        work = Path(args.work) / size
        start = time.perf_counter()
        base, experts, n_params = build_models(size, work / "models")
        build_s = time.perf_counter() - start
        print(f"{size}: {n_params / 1e9:.3f} B parameters, models ready in {build_s:.0f} s", flush=True)
        tiers = {tier: measure_tier(tier, base, experts, work, args) for tier in args.tiers.split(",")}
        (work / "measured.json").write_text(json.dumps(tiers, indent=1))  # kept if the report below fails
        shots = [] if args.no_mergekit else oneshot(base, experts, work, args.threads)
        report_size(size, n_params, build_s, tiers, shots, args.kernels if args.compile else "eager")
        projection(n_params, tiers)
        if not args.keep:
            shutil.rmtree(work / "models", ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        if f.tell() == 0:
            f.write("# Scale benchmark (benchmarks/scale.py)\n")
        f.write("\n".join(out_lines) + "\n")
    print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
