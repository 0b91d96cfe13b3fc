"""What hooks cost: decode speed with no hook registered vs the same forward with hooks compiled out.

"Compiled out" is the architecture's own source with every ``hooks(name, x)`` call replaced by ``x`` and every
``hooks.active`` by ``False`` (an AST rewrite of ``rocmforge/arch/<family>.py`` and ``rocmforge/arch/context.py``),
so the two builds differ in exactly the hook calls, the f-string names they build and the ``active`` check.
The builds take turns decoding one token each in the same generation (the order flips each round), so they see
the same KV lengths and the same machine load; each row gives the median step's speed and the median of the
per-round speed ratios against the compiled-out build. A second compiled-out row measures the noise floor. Two
more rows show what registered hooks cost: one cached residual point, and one attention pattern (which switches
that layer from the fused attention to scores -> softmax -> mix).

    .venv/bin/python benchmarks/hook_overhead.py --steps 300
"""
from __future__ import annotations

import argparse
import ast
import inspect
import statistics
import time
import types
from collections.abc import Callable
from datetime import date

import numpy as np

import rocmforge
from rocmforge.arch import context as arch_context
from rocmforge.hooks import Hooks, caching_hook


class _StripHooks(ast.NodeTransformer):
    """``hooks(name, x)`` / ``ctx.hooks(name, x)`` -> ``x``; ``hooks.active`` / ``ctx.hooks.active`` -> ``False``."""

    @staticmethod
    def _is_hooks(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == "hooks") or \
            (isinstance(node, ast.Attribute) and node.attr == "hooks")

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if self._is_hooks(node.func) and len(node.args) == 2:
            return node.args[1]
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if node.attr == "active" and self._is_hooks(node.value):
            return ast.copy_location(ast.Constant(False), node)
        return node


def compile_without_hooks(module: types.ModuleType, **replace: object) -> types.ModuleType:
    """A copy of ``module`` built from its source with the hook calls stripped; ``replace`` overrides globals."""
    tree = _StripHooks().visit(ast.parse(inspect.getsource(module)))
    ast.fix_missing_locations(tree)
    stripped = types.ModuleType(module.__name__)  # same name: dataclasses look their module up by it
    exec(compile(tree, f"<{module.__name__} without hooks>", "exec"), stripped.__dict__)
    stripped.__dict__.update(replace)
    left = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _StripHooks._is_hooks(n.func)]
    assert not left, f"{len(left)} hook calls survived the rewrite"
    return stripped


def hook_calls_per_token(model: rocmforge.Model, prompt: list[int]) -> int:
    """How many ``hooks(name, x)`` calls one decode step makes (all of them return at ``active`` = False)."""
    class Counting(Hooks):
        calls = 0

        def __call__(self, name: str, x: object) -> object:
            Counting.calls += 1
            return x

    gen = model.start(prompt, max_new_tokens=4, temperature=0)
    gen.prefill()
    gen.step()
    model.ctx.hooks = Counting()
    try:
        gen.step()
    finally:
        model.ctx.hooks = model.hook_registry
        gen.close()
    return Counting.calls


def seconds_per_idle_hook_call(repeats: int = 200_000) -> float:
    """One call as the forward makes it: build the name with an f-string, call, return at the ``active`` check."""
    hooks, x, p = Hooks(), np.zeros(1, np.float32), "blocks.17"
    start = time.process_time()
    for _ in range(repeats):
        hooks(f"{p}.attn.hook_rot_q", x)
    return (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=300, help="timed decode steps per build")
    args = parser.parse_args()

    model = rocmforge.load(args.model, device="cpu", n_ctx=1024)
    hooked_arch = model.arch
    plain_context = compile_without_hooks(arch_context)
    stripped_arch = compile_without_hooks(hooked_arch, attend=plain_context.attend)
    prompt = model.tokenize("The history of the printing press begins")
    model.arch = stripped_arch
    without_hooks = model.forward(prompt)
    model.arch = hooked_arch
    assert np.array_equal(without_hooks, model.forward(prompt)), "the build without hooks computes something else"

    store: dict[str, np.ndarray] = {}
    layer = model.cfg.n_layers // 2
    builds: dict[str, tuple[types.ModuleType, Callable[[], object]]] = {
        "hooks compiled out": (stripped_arch, lambda: model.hooks([])),
        "hooks compiled out, again (the noise floor)": (stripped_arch, lambda: model.hooks([])),
        "no hook registered": (hooked_arch, lambda: model.hooks([])),
        f"1 hook: cache blocks.{layer}.hook_resid_post": (hooked_arch, lambda: model.hooks(
            [(f"blocks.{layer}.hook_resid_post", caching_hook(store))])),
        f"1 hook: cache blocks.{layer}.attn.hook_pattern": (hooked_arch, lambda: model.hooks(
            [(f"blocks.{layer}.attn.hook_pattern", caching_hook(store))])),
    }
    # One generation, the builds taking turns step by step (order flipped every round): each build sees the
    # same KV lengths and the same moments of machine load, so even a busy machine compares them fairly.
    wall: dict[str, list[float]] = {name: [] for name in builds}
    cpu: dict[str, list[float]] = {name: [] for name in builds}
    gen = None
    for i in range(args.steps + 2):
        if gen is None or gen.finished:
            if gen is not None:
                gen.close()
            gen = model.start(prompt, max_new_tokens=model.n_ctx - len(prompt) - 1, temperature=0)
            gen.prefill()
            gen.step()  # the first sample needs no forward
        for name in (list(builds) if i % 2 == 0 else list(reversed(builds))):
            model.arch, hooks = builds[name]
            with hooks():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                gen.step()
                if i >= 2:  # the first rounds page in weights and let BLAS settle
                    wall[name].append(time.perf_counter() - start_wall)
                    cpu[name].append(time.process_time() - start_cpu)
    model.arch = hooked_arch
    gen.close()

    try:
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i['internal_api']} {i.get('architecture', '')} {i['num_threads']} threads"
                         for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        blas = "unknown (install threadpoolctl)"
    print(f"{date.today()}  {args.model}  CPU  BLAS: {blas}  {args.steps} decode steps per build, interleaved")
    print("| build | decode tok/s (median step) | speed vs compiled out, wall clock | same, CPU time |")
    print("|---|---|---|---|")
    for name in builds:
        relative = [statistics.median(b / v for b, v in zip(times["hooks compiled out"], times[name]))
                    for times in (wall, cpu)]
        print(f"| {name} | {1 / statistics.median(wall[name]):.1f} | {100 * (relative[0] - 1):+.1f}% "
              f"| {100 * (relative[1] - 1):+.1f}% |")
    calls, per_call = hook_calls_per_token(model, prompt), seconds_per_idle_hook_call()
    step = statistics.median(cpu["hooks compiled out"])
    print(f"Idle-hook bookkeeping per decode token: {calls} calls x {per_call * 1e9:.0f} ns = "
          f"{calls * per_call * 1e6:.0f} us CPU = {100 * calls * per_call / step:.2f}% of a compiled-out step "
          f"({step * 1e3:.1f} ms CPU)")


if __name__ == "__main__":
    main()
