"""Top-k thresholds from bucket counts against the sorted copy they replace, on a store of realistic size.

A random Llama built from a config (nothing downloaded; ``--layers``/``--hidden`` size it, the
default is about 100 M parameters) with bfloat16-rounded weights, and ``--tasks`` experts: each the
base plus seeded Gaussian noise, rounded to bfloat16 again, so that |τ| ties as real checkpoints do.
``--kernels compiled`` (the default: as the engine runs them wherever a C++ compiler is usable; the
compilation is timed apart, see ``time_candidates``) or ``eager``; both forms run the same kernels;
``--threads`` torch threads.

For Task Arithmetic, TIES (global, tensor), Breadcrumbs (row), PCB (global) and DELLA, in one run,
side by side: the bucket counts (``new``: ``OrderStatistics``) and the previous implementation
(``sorted``: a sorted copy of each block's scores per score kind and scope, kept here as the
baseline). Printed per row: the first candidate's time (setup: the statistics and the merge), the
median time of the next candidates, the ratio to Task Arithmetic, setup over one candidate, the
bytes the threshold structures hold beyond the store (absolute and as a share of the store), the
bytes of cached score kinds (PCB's β, DELLA's ranks: [T, D] each, the same in both forms), and the
peak RSS while the method ran. DELLA ranks within rows by its own cached ranks, not by thresholds:
it is measured once, for reference.
Targets (issue 14): extra memory ≤ 10% of the store for global and tensor scope, ≤ 25% for row
scope; first-candidate setup ≤ 10× one candidate; TIES / Breadcrumbs / PCB per candidate ≤ 3× TA.

Usage: python benchmarks/thresholds.py [--tasks 3] [--reps 3] [--layers 20] [--hidden 576] [--threads 1]
       [--kernels compiled|eager] [--forms new,sorted] [--methods ...]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from merge_speed import peak_rss_bytes, peak_rss_reset, timed
from transformers import LlamaConfig, LlamaForCausalLM

from mergetune.merging.engine import Merger, compile_available
from mergetune.merging.methods import METHODS
from mergetune.merging.modelset import ModelSet
from mergetune.merging.stats import OrderStatistics, Scope, ScoreFn, abs_scores
from mergetune.recipe import Recipe

VARIANTS: dict[str, tuple[str, dict, bool]] = {  # label -> (method, options, uses thresholds)
    "task_arithmetic": ("task_arithmetic", {}, False),
    "ties (global)": ("ties", {"scope": "global"}, True),
    "ties (tensor)": ("ties", {"scope": "tensor"}, True),
    "breadcrumbs (row)": ("breadcrumbs", {"scope": "row"}, True),
    "pcb (global)": ("pcb", {"scope": "global"}, True),
    "della": ("della", {}, False),
}
BUDGET = {"global": 0.10, "tensor": 0.10, "row": 0.25}
TARGET_3X = {"ties", "breadcrumbs", "pcb"}


class SortedStatistics(OrderStatistics):
    """The previous implementation, the baseline: every block's scores sorted once and stored ([T, D] each)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sorted: dict[tuple[str, Scope], torch.Tensor] = {}

    def kth_largest(self, kind: str, scope: Scope, k: torch.Tensor, compute: ScoreFn = abs_scores) -> torch.Tensor:
        if (kind, scope) not in self._sorted:
            self._sorted[(kind, scope)] = self._sort_blocks(kind, scope, compute)
        start, length = self.rows.blocks(scope, self.modelset)
        vals = self._sorted[(kind, scope)].gather(1, start + length - k.clamp(min=1))
        return torch.where(k > 0, vals, torch.full_like(vals, math.inf))

    def _sort_blocks(self, kind: str, scope: Scope, compute: ScoreFn) -> torch.Tensor:
        ms = self.modelset
        full = None if kind == "abs" else self.scores(kind, compute)
        out = None
        for t in range(ms.n_tasks):
            scores = ms.tau[t].abs() if full is None else full[t]
            out = torch.empty(ms.n_tasks, ms.numel, dtype=scores.dtype) if out is None else out
            if scope is Scope.GLOBAL:
                out[t] = torch.sort(scores).values
                continue
            for seg in ms.segments:
                block = scores[seg.offset : seg.end]
                block = block.reshape(-1, seg.row_length) if scope is Scope.ROW else block
                out[t, seg.offset : seg.end] = torch.sort(block, dim=-1).values.reshape(-1)
        return out

    def held_bytes(self) -> dict[str, int]:
        held = super().held_bytes()
        held["thresholds"] += sum(t.numel() * t.element_size() for t in self._sorted.values())
        return held


def build_modelset(n_tasks: int, layers: int, hidden: int) -> ModelSet:
    """A random Llama (SmolLM2-135M's proportions) and bf16-rounded perturbed experts: τ ties like real weights."""
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    base = {k: v.detach().to(torch.bfloat16).float() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del model
    gen = torch.Generator().manual_seed(1)
    experts = {
        f"task{t}": {
            k: (v + 2e-3 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16).float() for k, v in base.items()
        }
        for t in range(n_tasks)
    }
    ms = ModelSet.load(base, experts)
    del base, experts
    gc.collect()
    return ms


def candidates(ms: ModelSet, method: str, options: dict, n: int, seed: int) -> list[Recipe]:
    """n candidates with per-task × per-group weights and densities, as a search proposes them."""
    rng = np.random.default_rng(seed)
    n_groups = len(ms.layer_groups(1))
    experts = [{"name": t, "model": t} for t in ms.task_names]
    out = []
    for i in range(n):
        weight = {t: rng.uniform(0.2, 1.0, n_groups).round(4).tolist() for t in ms.task_names}
        density = {t: rng.uniform(0.1, 0.5, n_groups).round(4).tolist() for t in ms.task_names}
        uses = METHODS[method].uses_density
        out.append(
            Recipe(
                base="llama",
                experts=experts,
                method=method,
                weight=weight,
                density=density if uses else 1.0,
                options=options,
                seed=i,
            )
        )
    return out


KERNELS = ("compiled", "eager")


def use_compile(kernels: str) -> bool:
    """``compiled``: the engine's own default (torch.compile where a C++ compiler is usable), else eager."""
    return kernels == "compiled" and compile_available(torch.device("cpu"))


def time_candidates(
    ms: ModelSet,
    recipes: list[Recipe],
    compile: bool,
    sorted_copy: bool = False,
    before_each: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """The first candidate (setup) and the median of the others, with peak RSS and held bytes.

    ``before_each`` runs (untimed) before every timed merge: e.g. dropping a disk store's pages
    from the page cache, so each candidate reads it as a store larger than RAM would be read.

    Compiled: a first Merger compiles the kernels (its first candidate, statistics included, is
    ``compile_setup``); a second one reuses those compiled functions, so ``setup`` is what the
    statistics cost, as in a process whose kernels torch has already compiled and cached.
    """
    gc.collect()
    compiled: dict | None = None
    compile_setup = math.nan
    if compile:
        warm = Merger(ms, compile=True)
        compile_setup = timed(lambda: warm.merge(recipes[0]))
        compiled = warm._kernels  # the engine keeps its compiled kernels per method in this dict
        del warm
        gc.collect()
    peak_rss_reset()
    merger = Merger(ms, compile=compile)
    if compiled is not None:
        merger._kernels = compiled
    layout = merger.layout(recipes[0].grouping.granularity)
    if sorted_copy:
        layout.stats = SortedStatistics(ms, layout.rows)
    before_each()
    t0 = time.perf_counter()
    merged = merger.merge(recipes[0])
    setup = time.perf_counter() - t0
    output = sum(v.numel() * v.element_size() for v in merged.values())
    del merged
    setup_peak = peak_rss_bytes()
    per = []
    for i, recipe in enumerate(recipes[1:]):
        before_each()
        if i == 0:  # after before_each: pages of a mapped store that the setup read and it dropped are not counted
            peak_rss_reset()
        per.append(timed(lambda r=recipe: merger.merge(r)))
    result = {
        "setup": setup,
        "compile_setup": compile_setup,
        "per": statistics.median(per),
        "setup_peak": setup_peak,
        "peak": peak_rss_bytes(),
        "output": output,
        **layout.stats.held_bytes(),
    }
    gc.collect()
    return result


def measure(ms: ModelSet, label: str, reps: int, sorted_copy: bool, compile: bool) -> dict[str, float]:
    method, options, _ = VARIANTS[label]
    recipes = candidates(ms, method, options, reps + 1, seed=7)
    return time_candidates(ms, recipes, compile, sorted_copy)


HEADER = (
    f"{'method':<20}{'stats':<8}{'compile s':>10}{'setup s':>9}{'per cand ms':>13}{'x TA':>7}{'setup/cand':>12}"
    f"{'thresh MiB':>11}{'% store':>9}{'scores MiB':>11}{'peak RSS MiB':>14}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="candidates timed after the first")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(VARIANTS))
    parser.add_argument("--forms", default="new,sorted", help="new (bucket counts) and/or sorted (the baseline)")
    parser.add_argument("--kernels", choices=KERNELS, default="compiled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compile = use_compile(args.kernels)

    t0 = time.perf_counter()
    ms = build_modelset(args.tasks, args.layers, args.hidden)
    store = ms.tau.numel() * ms.tau.element_size()
    print(
        f"random Llama, {args.layers} layers, hidden {args.hidden}: {ms.numel / 1e6:.1f} M merged parameters, "
        f"{args.tasks} experts (bf16-rounded), store {store / 2**20:.0f} MiB float32, built in "
        f"{time.perf_counter() - t0:.0f} s; {args.threads} thread(s), "
        f"{'compiled' if compile else 'eager'} kernels, torch {torch.__version__}\n"
    )
    print(HEADER, flush=True)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for label in [m for m in args.methods.split(",") if m in VARIANTS]:
        forms = [f for f in args.forms.split(",") if f == "new" or VARIANTS[label][2]]
        for form in forms:
            rows[(label, form)] = r = measure(ms, label, args.reps, form == "sorted", compile)
            ta = rows.get(("task_arithmetic", "new"), r)["per"]
            print(
                f"{label:<20}{form:<8}{r['compile_setup']:>10.2f}{r['setup']:>9.2f}"
                f"{r['per'] * 1e3:>13.0f}{r['per'] / ta:>7.2f}"
                f"{r['setup'] / r['per']:>12.1f}{r['thresholds'] / 2**20:>11.1f}{100 * r['thresholds'] / store:>8.1f}%"
                f"{r['scores'] / 2**20:>11.0f}"
                f"{max(r['peak'], r['setup_peak']) / 2**20:>14.0f}",
                flush=True,
            )
    print_verdicts(rows, store)


def print_verdicts(rows: dict[tuple[str, str], dict[str, float]], store: int) -> None:
    if ("task_arithmetic", "new") not in rows:
        return
    ta = rows[("task_arithmetic", "new")]["per"]
    print("\nTargets (new):")
    for (label, form), r in rows.items():
        method, options, thresholds = VARIANTS[label]
        if form != "new" or not thresholds:
            continue
        budget = BUDGET[options.get("scope", "global")]
        checks = [
            (f"thresholds ≤ {budget:.0%} of store", r["thresholds"] / store, r["thresholds"] <= budget * store, "%"),
            ("setup ≤ 10x one candidate", r["setup"] / r["per"], r["setup"] <= 10 * r["per"], "x"),
        ]
        if method in TARGET_3X:
            checks.append(("per candidate ≤ 3x TA", r["per"] / ta, r["per"] <= 3 * ta, "x"))
        for name, value, met, unit in checks:
            shown = f"{100 * value:.1f}%" if unit == "%" else f"{value:.2f}x"
            print(f"  {label:<20} {name}: {shown} -> {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
