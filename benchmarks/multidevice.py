"""Several devices in one worker: the per-candidate merge placed over devices against one device, side by side.

A Llama built from a config with seeded random weights (nothing downloaded) and ``--experts`` seeded
perturbations of it. One ModelSet; Mergers over it: on ``--device`` alone, and placed over
``--devices`` (balanced map). Printed: the plan (groups and store bytes per device), then per method
the median seconds per candidate of each and their ratio, and whether the placed merge equals the
one-device merge bit for bit. On a CPU-only machine use ``--devices cpu,cpu`` (the default): the same
code as two GPUs, measuring the placement's own overhead (per-device parts, per-item argument slices).

Usage: python benchmarks/multidevice.py [--layers 8] [--hidden 512] [--experts 3] [--devices cuda:0,cuda:1]
       [--device cuda:0] [--reps 3] [--methods task_arithmetic,ties,dare_ties]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.merging.placement import group_store_bytes, plan_placement, resolve_devices
from mergetune.recipe import Expert, Recipe


def build_models(root: Path, layers: int, hidden: int, experts: int) -> tuple[Path, dict[str, Path]]:
    """A random Llama base and ``experts`` copies perturbed by seeded Gaussian noise (1e-2 relative)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    out = {}
    for e in range(experts):
        generator = torch.Generator().manual_seed(100 + e)
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 1e-2 * p.abs().mean())
        model.save_pretrained(root / f"expert{e}")
        out[f"expert{e}"] = root / f"expert{e}"
    return root / "base", out


def per_candidate(merger: Merger, recipe: Recipe, reps: int) -> float:
    merger.merge(recipe)  # setup (order statistics, kernels) outside the timing
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        merger.merge(recipe)
        for buffer in merger.output_buffers(torch.float32):
            if buffer.device.type == "cuda":
                torch.cuda.synchronize(buffer.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--devices", default="cpu,cpu")
    parser.add_argument("--device", default="cpu", help="the one-device baseline")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    args = parser.parse_args()
    torch.set_num_threads(1)
    devices = resolve_devices(args.devices.split(","))
    with tempfile.TemporaryDirectory(prefix="multidevice-") as tmp:
        base, experts = build_models(Path(tmp), args.layers, args.hidden, args.experts)
        host = ModelSet.load(base, experts)  # the host store a placed worker keeps
        one = host.placed(args.device)
        groups = host.layer_groups(1)
        placement = plan_placement(group_store_bytes(host, groups), devices)
        compiled = os.environ.get("MERGETUNE_COMPILE", "1")
        print(f"llama {args.layers} layers × {args.hidden}: {host.numel / 1e6:.1f} M merged parameters, ", end="")
        print(f"{args.experts} experts; load average {os.getloadavg()[0]:.2f}; one torch thread; compile {compiled}")
        print(placement.describe())
        single, placed = Merger(one), Merger(host, placement=placement)
        print(f"{'method':<18}{'one device s':>14}{'placed s':>12}{'ratio':>8}  equal")
        for method in args.methods.split(","):
            recipe = Recipe(
                base=str(base),
                experts=[Expert(name=t, model=str(p)) for t, p in experts.items()],
                method=method,
                density=0.3,
                weight=0.5,
            )
            a, b = per_candidate(single, recipe, args.reps), per_candidate(placed, recipe, args.reps)
            want, got = single.merge(recipe), placed.merge(recipe)
            equal = all(torch.equal(got[k].cpu(), want[k].cpu()) for k in want)
            print(f"{method:<18}{a:>14.4f}{b:>12.4f}{b / a:>8.2f}  {equal}")


if __name__ == "__main__":
    main()
