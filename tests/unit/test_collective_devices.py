"""Every tensor robe_dist hands to a torch.distributed collective lives on the compute device.

A process group whose only backend is NCCL takes CUDA tensors only; a CPU machine's gloo group
takes anything, so a tensor built on the CPU (``.cpu()``, a factory without ``device=``) passes
every CPU test and stops the first multi-GPU run. This test reads robe_dist's source: for each
collective call it finds how the tensor argument was made in the enclosing function and requires
an explicit device (``device=...``, ``.to(device)``, ``torch.*_like`` of such a tensor, a
parameter's data or gradient). The GPU device check (launch/gpu_check.sh) then runs the trainer
under an NCCL-only group.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import robe_dist

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
}  # fmt: skip
TENSOR_ARGS = {"all_gather": [0, 1], "all_gather_into_tensor": [0, 1], "reduce_scatter_tensor": [0, 1]}
# tensors whose device is the parameter's (set where the parameter was placed)
DEVICE_OF_PARAMETER = ("grad", "data")


def _made_on_a_device(expr: ast.AST, assignments: Dict[str, ast.AST], depth: int = 0) -> Optional[str]:
    """``None`` when ``expr`` provably carries an explicit device, else the reason it does not."""
    if depth > 8:
        return "too many indirections"
    src = ast.unparse(expr)
    for node in ast.walk(expr):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cpu":
            return f"{src!r} moves it to the CPU"
    if isinstance(expr, ast.Call):
        if any(k.arg == "device" for k in expr.keywords):
            return None
        func = expr.func
        if isinstance(func, ast.Attribute) and func.attr == "to" and (expr.args or expr.keywords):
            return None
        if isinstance(func, ast.Attribute) and func.attr.endswith("_like") and expr.args:
            return _made_on_a_device(expr.args[0], assignments, depth + 1)
        if isinstance(func, ast.Attribute) and func.attr in ("detach", "clone", "contiguous", "div_", "mul_"):
            return _made_on_a_device(func.value, assignments, depth + 1)
        return f"{src!r} is made without an explicit device"
    if isinstance(expr, ast.Attribute):
        if expr.attr in DEVICE_OF_PARAMETER:
            return None
        if isinstance(expr.value, ast.Name) and expr.value.id == "self":
            return None  # an attribute of the object: checked where it is assigned (same rule, in __init__)
        return _made_on_a_device(expr.value, assignments, depth + 1)
    if isinstance(expr, ast.Name):
        if expr.id not in assignments:
            return f"{src!r} is not assigned in the function (a parameter: the caller decides its device)"
        return _made_on_a_device(assignments[expr.id], assignments, depth + 1)
    if isinstance(expr, (ast.List, ast.ListComp)):
        inner = expr.elt if isinstance(expr, ast.ListComp) else (expr.elts[0] if expr.elts else None)
        return None if inner is None else _made_on_a_device(inner, assignments, depth + 1)
    if isinstance(expr, ast.Subscript):
        return _made_on_a_device(expr.value, assignments, depth + 1)
    return f"{src!r}: cannot tell its device"


def collective_problems(source: str, where: str) -> List[str]:
    """Collective calls in ``source`` whose tensors are not provably on an explicit device."""
    tree = ast.parse(source)
    problems = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        assignments: Dict[str, ast.AST] = {}
        for node in ast.walk(func):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assignments[target.id] = node.value
                    elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                        assignments[f"self.{target.attr}"] = node.value
        for node in ast.walk(func):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in COLLECTIVES or not isinstance(node.func.value, ast.Name) or node.func.value.id != "dist":
                continue
            for i in TENSOR_ARGS.get(node.func.attr, [0]):
                if i >= len(node.args):
                    continue
                arg = node.args[i]
                key = ast.unparse(arg)
                reason = _made_on_a_device(assignments[key] if key in assignments else arg, assignments)
                if reason:
                    problems.append(f"{where}:{node.lineno}: dist.{node.func.attr}: {reason}")
    return problems


def test_every_collective_in_robe_dist_gets_a_tensor_on_an_explicit_device():
    root = Path(robe_dist.__file__).parent
    problems = []
    calls = 0
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        calls += source.count("dist.")
        problems += collective_problems(source, str(path.relative_to(root.parent)))
    assert calls > 0
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_cpu_tensor_and_a_default_device_factory():
    bad = textwrap.dedent(
        """
        def check(self):
            sig = self.hash_signature.detach().cpu()
            gathered = [torch.empty_like(sig) for _ in range(2)]
            dist.all_gather(gathered, sig, group=self._pg)

        def count(value):
            t = torch.tensor([value])
            dist.all_reduce(t)
        """
    )
    problems = collective_problems(bad, "bad.py")
    assert len(problems) == 3, problems  # both all_gather tensors, and the all_reduce one
    assert "moves it to the CPU" in problems[0]
    assert "without an explicit device" in problems[2]
    good = textwrap.dedent(
        """
        def count(value, env):
            t = torch.tensor([value], device=env.device)
            dist.all_reduce(t)
        """
    )
    assert collective_problems(good, "good.py") == []
