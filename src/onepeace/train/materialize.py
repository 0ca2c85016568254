"""Building a training module on the meta device and materialising only what this rank holds.

A module is constructed under :func:`record_init`: every parameter and buffer lives on the meta device (no memory)
and every tensor operation of the construction (allocations, the constructors' default initialisation, the seeded
:func:`onepeace.model.init.init_weights`) is recorded. After the module is wrapped (FSDP2 shards the meta module)
and given storage on this rank's device (``to_empty``), :func:`materialize` replays the recorded operations in
order on the host, one tensor at a time, with the same seed: the host's random generator is consumed exactly as in
an eager construction, so every value equals the eager one bit for bit. As soon as a tensor's value is final, this
rank's shard of it (the whole tensor under DDP) is copied to the device and the host copy is dropped; a value that
is overwritten later (a constructor's default initialisation replaced by ``init_weights``) lives only as long as the
operation that draws it. The host therefore never holds more than about one tensor of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_META = torch.device("meta")
_HOST = torch.device("cpu")
#: In-place operations that overwrite every element of their first argument without reading it.
_OVERWRITES = frozenset(
    ["uniform_", "normal_", "zero_", "fill_", "random_", "bernoulli_", "exponential_", "geometric_", "copy_"]
)
#: Factories that fill a tensor from Python data outside the dispatcher; recorded as a host tensor copied to meta.
_DATA_FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray)
#: ``torch.nn.init`` functions that return at once on a meta tensor (``trunc_normal_`` samples by rejection, so
#: how much it draws depends on the values): recorded as one call each and called on the host tensor in the replay.
_OPAQUE_INITS = ("trunc_normal_", "orthogonal_", "sparse_", "dirac_")


@dataclass(frozen=True)
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    out: Any


@dataclass(frozen=True)
class _Target:
    """Where a module tensor sits in its storage (element offset, sizes, strides) and under which name."""

    name: str
    is_param: bool
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class InitRecord:
    """A meta-device module and the operations that give its tensors their values.

    Attributes:
        module: the module as built (meta tensors; wrap it, then call :func:`materialize`).
        ops: the recorded operations, in execution order.
        targets: per storage key, the module tensors that live in that storage.
        host_values: module tensors built on the host rather than meta (kept as they are).
    """

    module: nn.Module
    ops: list[_Op]
    targets: dict[int, list[_Target]] = field(default_factory=dict)
    host_values: dict[str, Tensor] = field(default_factory=dict)


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _is_meta(x: Any) -> bool:
    return isinstance(x, Tensor) and x.device.type == "meta"


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list[_Op]) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(_Op(func, args, kwargs, out))  # holding the meta tensors keeps their storage keys unique
        return out


class _HostData(TorchFunctionMode):
    """``torch.tensor(data)`` on the meta device loses ``data``; build it on the host and copy it to meta instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DATA_FACTORIES and torch.device(kwargs.get("device") or _HOST).type == "meta":
            return func(*args, **{**kwargs, "device": _HOST}).to(_META)
        return func(*args, **kwargs)


@contextmanager
def _opaque_inits(ops: list[_Op]) -> Iterator[None]:
    originals = {name: getattr(nn.init, name) for name in _OPAQUE_INITS}

    def recorder(original: Callable) -> Callable:
        def record(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if not _is_meta(tensor):
                return original(tensor, *args, **kwargs)
            ops.append(_Op(original, (tensor, *args), kwargs, tensor))
            return tensor

        return record

    try:
        for name, original in originals.items():
            setattr(nn.init, name, recorder(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


def record_init(build: Callable[[], nn.Module]) -> InitRecord:
    """Run ``build()`` on the meta device, recording every tensor operation it performs.

    ``build`` must be the same code an eager construction runs (seeding included): :func:`materialize` then gives
    every tensor the value the eager construction gives it.
    """
    ops: list[_Op] = []
    with _opaque_inits(ops), _HostData(), torch.device(_META), _Recorder(ops):  # device context first, then _HostData
        module = build()
    record = InitRecord(module, ops)
    tensors = [(n, t, True) for n, t in module.named_parameters(remove_duplicate=False)]
    tensors += [(n, t, False) for n, t in module.named_buffers(remove_duplicate=False)]
    for name, t, is_param in tensors:
        if not _is_meta(t):
            record.host_values[name] = t.detach().clone()
            continue
        target = _Target(name, is_param, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        record.targets.setdefault(_key(t), []).append(target)
    return record


def _touched(op: _Op) -> list[int]:
    leaves = tree_flatten((op.args, op.kwargs, op.out))[0]
    return list(dict.fromkeys(_key(x) for x in leaves if _is_meta(x)))


def _overwrites(op: _Op, key: int) -> bool:
    """True when ``op`` replaces every element of storage ``key`` without reading it."""
    name = op.func.__name__.split(".")[0]
    if name not in _OVERWRITES or not op.args or not _is_meta(op.args[0]) or _key(op.args[0]) != key:
        return False
    self = op.args[0]
    whole = self.is_contiguous() and self.storage_offset() == 0
    whole = whole and self.numel() * self.element_size() == self.untyped_storage().nbytes()
    others = tree_flatten((op.args[1:], op.kwargs))[0]
    return whole and not any(_is_meta(x) and _key(x) == key for x in others)


def _schedule(ops: list[_Op]) -> tuple[list[list[int]], dict[int, int], set[tuple[int, int]]]:
    """Per op the storages it touches, each storage's last op, and the (op, storage) pairs after which the
    storage's content is dead because the next op on it overwrites it entirely."""
    touched = [_touched(op) for op in ops]
    last: dict[int, int] = {}
    following: dict[int, int] = {}
    dead: set[tuple[int, int]] = set()
    for i in range(len(ops) - 1, -1, -1):
        for key in touched[i]:
            last.setdefault(key, i)
            nxt = following.get(key)
            if nxt is not None and _overwrites(ops[nxt], key):
                dead.add((i, key))
            following[key] = i
    return touched, last, dead


@dataclass
class _Replay:
    host: dict[int, torch.UntypedStorage] = field(default_factory=dict)

    def real(self, x: Any) -> Any:
        if isinstance(x, torch.device) and x.type == "meta":
            return _HOST
        if not _is_meta(x):
            return x
        key = _key(x)
        if key not in self.host:
            self.host[key] = torch.UntypedStorage(x.untyped_storage().nbytes(), device=_HOST)
        return torch.empty(0, dtype=x.dtype).set_(self.host[key], x.storage_offset(), x.shape, x.stride())

    def adopt(self, meta: Any, real: Any) -> None:
        """Register the host storage of a freshly made tensor (same layout as its meta twin)."""
        if not _is_meta(meta) or _key(meta) in self.host:
            return
        if real.storage_offset() != meta.storage_offset() or real.stride() != meta.stride():
            fresh = self.real(meta)
            fresh.copy_(real)
            return
        self.host[_key(meta)] = real.untyped_storage()


def replay(record: InitRecord, emit: Callable[[_Target, Tensor], None]) -> None:
    """Run ``record``'s operations on the host; call ``emit(target, value)`` once per module tensor, as soon as its
    value is final (``value`` is a host tensor, valid only during the call)."""
    touched, last, dead = _schedule(record.ops)
    never = [t.name for key, targets in record.targets.items() if key not in last for t in targets]
    if never:
        raise RuntimeError(f"no recorded operation gives a value to {never[:8]}: build them inside record_init")
    state = _Replay()
    with torch.no_grad():
        for i, op in enumerate(record.ops):
            out = op.func(*tree_map(state.real, op.args), **tree_map(state.real, op.kwargs))
            metas, reals = tree_flatten(op.out)[0], tree_flatten(out)[0]
            for meta, real in zip(metas, reals):
                state.adopt(meta, real)
            for key in touched[i]:
                if last[key] == i:
                    for target in record.targets.get(key, ()):
                        emit(target, _view(state.host[key], target))
                    state.host.pop(key, None)
                elif (i, key) in dead:
                    state.host.pop(key, None)


def _view(storage: torch.UntypedStorage, t: _Target) -> Tensor:
    return torch.empty(0, dtype=t.dtype).set_(storage, t.offset, t.size, t.stride)


def _write(module: nn.Module, name: str, value: Tensor) -> None:
    """Copy this rank's part of the full host tensor ``value`` into the module tensor ``name``."""
    from onepeace.train.shard_load import local_value, module_tensor

    target = module_tensor(module, name)
    local = target.to_local() if hasattr(target, "to_local") else target
    part = local_value(value, target)
    if tuple(part.shape) != tuple(local.shape):
        raise RuntimeError(f"{name}: this rank holds {tuple(local.shape)}, its part is {tuple(part.shape)}")
    with torch.no_grad():
        local.copy_(part)


def _plain_parameter_hooks(module: nn.Module) -> dict[str, tuple[list, list]]:
    """Gradient hooks of the parameters FSDP2 does not manage (e.g. the replicated scalars' averaging hook):
    ``to_empty`` replaces those parameters with new objects, so the hooks are registered on them again."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in module.named_parameters():
        if isinstance(param, DTensor):
            continue
        grad = list((param._backward_hooks or {}).values())
        accumulate = list((param._post_accumulate_grad_hooks or {}).values())
        if grad or accumulate:
            out[name] = (grad, accumulate)
    return out


def materialize(record: InitRecord, device: torch.device | str) -> nn.Module:
    """Give ``record.module`` (meta, possibly already sharded by FSDP2) storage on ``device`` and its values.

    Only this rank's shards are allocated on ``device``; the host holds one full tensor at a time. Gradient hooks
    registered on parameters FSDP2 does not manage are carried over to their new objects. Returns the module (the
    same object).
    """
    module = record.module
    hooks = _plain_parameter_hooks(module)
    module.to_empty(device=torch.device(device))
    for name, (grad_hooks, accumulate_hooks) in hooks.items():
        param = module.get_parameter(name)
        for hook in grad_hooks:
            param.register_hook(hook)
        for hook in accumulate_hooks:
            param.register_post_accumulate_grad_hook(hook)
    for name, value in record.host_values.items():
        _write(module, name, value)
    replay(record, lambda target, value: _write(module, target.name, value))
    return module


def materialize_for_ranks(
    record: InitRecord,
    strategy: str,
    device: torch.device,
    load: Callable[[], None] | None = None,
    **wrap_options: Any,
) -> nn.Module:
    """The second half of a meta-device build under DDP or FSDP; returns the module its forward runs through.

    FSDP2 shards the meta module first, so each rank allocates only its shards; then every rank materialises what
    it holds (:func:`materialize`), ``load`` reads the starting tensors into it (shard by shard), and DDP wraps the
    materialised module. Under FSDP2 the returned module is ``record.module`` itself (sharded in place).
    """
    from onepeace.train.distributed import wrap_model

    module = record.module
    if strategy == "fsdp":
        wrap_model(module, "fsdp", device=device, **wrap_options)
    materialize(record, device)
    if load is not None:
        load()
    return module if strategy == "fsdp" else wrap_model(module, strategy, **wrap_options)
