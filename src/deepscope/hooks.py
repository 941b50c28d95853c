"""Hooks: run a function on a module's output (forward) or on the gradient of its output (backward).

Hooks are resources (STYLE.md, habit 6): each `Hook` is a context manager with an idempotent `remove()`,
and never stores tensors, so looking inside a network cannot keep its activations alive. What to record is
the business of the function you pass; `deepscope.stats` is the main user.

Backward hooks are *tensor* hooks on the module's floating outputs, registered from a forward hook, rather
than `nn.Module.register_full_backward_hook`. The full backward hook wraps the output in a view that an
in-place op downstream (`nn.ReLU(inplace=True)` after a conv, a common layout) is not allowed to modify,
so it breaks ordinary models. A tensor hook registered before an in-place op fires with the gradient of
the value the module returned, which is what we want. The price: `grad_input` is not available (the
function receives an empty tuple), and a module with several floating outputs calls the function once
per output, with a one-element `grad_output`.
"""
from __future__ import annotations

import fnmatch
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.modules.activation as torch_activations
from torch import nn

from .layers import GeneralRelu

HookFn = Callable[..., None]
NamedModules = Sequence[tuple[str, nn.Module]]

# Normalisation layers: parameter-free ones (affine=False) are still worth watching.
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
# Activation layers, by type: every class torch lists in torch.nn.modules.activation (MultiheadAttention
# lives there too but is attention) and deepscope's own, subclasses included.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    *(getattr(torch_activations, n) for n in torch_activations.__all__ if n != "MultiheadAttention"), GeneralRelu)
_ACTIVATION_ATTR_NAMES = ("act", "activation", "relu", "nonlin")


def _is_activation(name: str, module: nn.Module) -> bool:
    """An activation by type (`ACTIVATION_TYPES`); failing that, a user's own activation class, which no type
    can name, recognised by the attribute holding it or by "relu" in its class name. Only the default
    selection asks, so a wrong guess costs one watched module too many or too few, never a wrong result."""
    if isinstance(module, ACTIVATION_TYPES):
        return True
    return name.rsplit(".", 1)[-1] in _ACTIVATION_ATTR_NAMES or "relu" in type(module).__name__.lower()


def _default_choice(name: str, module: nn.Module) -> bool:
    """Modules worth watching by default: those owning parameters, activations and norms."""
    owns_params = next(module.parameters(recurse=False), None) is not None
    return owns_params or _is_activation(name, module) or isinstance(module, _NORM_TYPES)


# Modules the default choice watches as a unit instead of their leaves: attention owns its input projection
# directly and uses its `out_proj` Linear's weights without calling it, so the leaf would never run.
WATCHED_AS_UNITS = (nn.MultiheadAttention,)


def select_modules(model: nn.Module, *, types: type | tuple[type, ...] | None = None,
                   names: Iterable[str] | None = None, filter: Callable[[str, nn.Module], bool] | None = None,
                   leaf_only: bool = True) -> list[tuple[str, nn.Module]]:
    """`(name, module)` pairs of `model.named_modules()` that pass every criterion given.

    `types`: a type or tuple of types; `names`: exact names or fnmatch patterns ("block*.act");
    `filter(name, module) -> bool`. A name given exactly selects that module even if it has children; a
    pattern matches leaves only. `leaf_only` keeps modules without children (pass False to select
    containers such as "block0"). With no criterion, the default picks leaf modules that own parameters
    directly or are activations or normalisation layers, so pooling/flatten/dropout layers are left out,
    and watches `WATCHED_AS_UNITS` (attention) whole. The root module "" is never selected by default.
    """
    patterns = list(names) if names is not None else None
    exact = set(patterns or ())
    default = types is None and patterns is None and filter is None
    units = [n for n, m in model.named_modules() if isinstance(m, WATCHED_AS_UNITS)] if default else []
    chosen = []
    for name, module in model.named_modules():
        if default and name in units:  # chosen whole, children and all (see WATCHED_AS_UNITS)
            chosen.append((name, module))
            continue
        if any(name.startswith(f"{u}.") for u in units):
            continue
        # A container named exactly (a residual block, a Transformer layer) is watched as a unit: its
        # output is what its functional ops (a residual sum, F.relu) make, which no leaf module shows.
        if leaf_only and next(module.children(), None) is not None and name not in exact:
            continue
        if types is not None and not isinstance(module, types):
            continue
        if patterns is not None and not any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if filter is not None and not filter(name, module):
            continue
        if types is None and patterns is None and filter is None and (name == "" or not _default_choice(name, module)):
            continue
        chosen.append((name, module))
    return chosen


def opaque(fn: HookFn) -> HookFn:
    """`fn`, run as plain Python even when the model runs under `torch.compile`. TorchDynamo would otherwise
    trace into a hook and cut the graph wherever the hook does something it cannot capture (a read-back, a
    timer, a list append). Kept out, the hook cuts the graph once, at the module it watches, and sees the
    real tensors, so what it records is what eager records. Every hook deepscope puts on a model goes
    through this. The wrapper costs ~2 us a call. It needs TorchDynamo loaded, which creating a torch
    optimizer does; importing it only for this would cost seconds, so a hook registered before it is loaded
    stays plain, and a compile then traces it like user code: slower to compile, same numbers."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return fn
    compiled_code_sees_hooks()
    return torch.compiler.disable(fn)


def compiled_code_sees_hooks() -> None:
    """Make torch.compile's code notice hooks added to or removed from a module after it was compiled.

    TorchDynamo by default does not guard on a module's hooks (`torch._dynamo.config.
    skip_nnmodule_hook_guards`, documented as unsafe): code compiled while a module had no hooks keeps
    running without the hooks added later, so statistics would silently stay empty. This turns the guard
    on for the process (a module whose hooks change is then recompiled) and, once, throws away code
    compiled before (`torch._dynamo.reset()`: it is compiled again when next called)."""
    import torch._dynamo as dynamo

    if dynamo.config.skip_nnmodule_hook_guards:
        dynamo.config.skip_nnmodule_hook_guards = False
        if dynamo.utils.counters["frames"]["ok"]:  # something was compiled without the guard
            dynamo.reset()


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile's OptimizedModule and (Distributed)DataParallel wrappers, so
    that its modules are named without the wrappers' `_orig_mod.` and `module.` prefixes."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def floating_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a module output: a tensor, or tuples/lists/dicts of them, nested."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in floating_tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in floating_tensors(item)]
    return []


class Hook:
    """Call `fn` on one module: `fn(hook, module, inputs, output)` after each forward (`kind="forward"`),
    or `fn(hook, module, grad_input, grad_output)` when the gradient of each floating output is computed
    (`kind="backward"`; see the module docstring for why `grad_input` is empty). Use it in a `with` block
    or call `remove()`, which may be called any number of times."""

    def __init__(self, module: nn.Module, fn: HookFn, *, kind: str = "forward", name: str = ""):
        if kind not in ("forward", "backward"):
            raise ValueError(f"Hook kind must be 'forward' or 'backward', got {kind!r}")
        self.module, self.fn, self.kind, self.name = module, fn, kind, name
        self.removed = False
        on_output = self._forward if kind == "forward" else self._watch_gradients
        self._handle = module.register_forward_hook(opaque(on_output))

    def _forward(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.fn(self, module, inputs, output)

    def _watch_gradients(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        for tensor in floating_tensors(output):
            if tensor.requires_grad:
                # The closure holds the hook and the module, never the tensor.
                tensor.register_hook(lambda grad, module=module: self._backward(module, grad))

    def _backward(self, module: nn.Module, grad: torch.Tensor) -> None:
        # A graph built before remove() may still run its tensor hooks: they must do nothing then.
        if not self.removed:
            self.fn(self, module, (), (grad,))

    def remove(self) -> None:
        self.removed = True
        self._handle.remove()

    def __enter__(self) -> "Hook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"Hook({self.name or type(self.module).__name__}, kind={self.kind}, {state})"


class Hooks:
    """One `Hook` per module, all calling `fn`. `modules` holds `(name, module)` pairs (as from
    `select_modules`) or bare modules. Indexable and iterable like a list; a context manager."""

    def __init__(self, modules: Iterable[tuple[str, nn.Module] | nn.Module], fn: HookFn, *, kind: str = "forward"):
        self.hooks: list[Hook] = []
        try:
            for item in modules:
                name, module = ("", item) if isinstance(item, nn.Module) else item
                self.hooks.append(Hook(module, fn, kind=kind, name=name))
        except BaseException:
            self.remove()  # a bad item half-way must not leave the earlier hooks behind
            raise

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __getitem__(self, i: int) -> Hook:
        return self.hooks[i]

    def __len__(self) -> int:
        return len(self.hooks)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def __repr__(self) -> str:
        return f"Hooks({len(self.hooks)} {self.hooks[0].kind if self.hooks else ''} hooks)"
