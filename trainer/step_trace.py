"""A training step replayed on the `meta` device at any size: every aten op it dispatches, with its
FLOPs, the bytes it reads and writes and its kernel launches, and the live memory over the step.

Nothing is computed on the meta device (tensors have shapes and dtypes, no values), so a step of
d_in 2304 x d_sae 65536 x batch 4096 replays in a second on any machine. Two users:
`trainer.memory` plans a stack's memory from the peak live bytes, and `benchmarks/gpu_model.py`
turns the op records into a modeled GPU time and compares it with the step's floor.

What a replay can and cannot see:
- The code path is CUDA's: the meta device is not "cpu", so chunked passes take their GPU size and
  BatchTopK its fixed-size `topk` selection; the caller sets `kernels` as `auto` would on CUDA
  (`StackedSAE.auto_fused`). CUDA's autocast cannot run on meta tensors: `MetaAutocast` applies its
  casts (matmuls to bf16, the float32 list to float32, weight casts cached per forward) at the
  Python level, where autocast's C++ dispatcher would.
- Bytes: an op reads its tensor inputs and writes its outputs once (views, allocations and
  metadata ops move nothing). A gather (`index_select`, `gather`, `embedding_bag`, ...) reads the
  rows it picks, not its whole table: `OpRecord.gathered` with `table`, the table's size, so the
  time model can let a table that fits in the GPU's L2 be read from HBM once. A scatter writes the
  rows it touches. `addmm` with a vector bias is cuBLASLt's bias epilogue (the bias read once); a
  `baddbmm`/`addmm` with a broadcast or full bias copies it into the output first and the GEMM
  reads it back (3 passes over the output), as ATen does.
- Ops this table does not know (custom ops, Triton kernels wrapped as ops) register their cost with
  `register_cost`, so the trace sees through them.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

# Define the custom ops whose costs are registered below.
import trainer.kernels.adam_tail  # noqa: F401
import trainer.kernels.gather_dot  # noqa: F401
import trainer.kernels.elementwise_gpu  # noqa: F401
import trainer.kernels.sparse  # noqa: F401

aten = torch.ops.aten


@dataclass
class OpRecord:
    """One dispatched op of a traced step."""

    name: str
    flops: float = 0.0
    """Floating-point operations of a matmul (torch.utils.flop_counter's formulas), else 0."""
    dtype: torch.dtype | None = None
    """The compute dtype of a matmul (its first input's), which sets its peak rate."""
    read: int = 0
    """Bytes streamed in (every input once)."""
    written: int = 0
    """Bytes written."""
    gathered: int = 0
    """Bytes of the rows a gather picks (a row picked twice counts twice)."""
    table: int = 0
    """Bytes of the table those rows come from (0 when `gathered` is 0)."""
    table_parts: int = 1
    """The table is used in this many equal parts one after another (a stack's runs, its entries grouped
    by run): a part that fits in L2 is read from HBM once."""
    launches: int = 1
    """Kernels launched."""
    phase: str = ""
    """The step's phase the op ran in: forward, backward (autograd's), update (what follows the backward)."""


Cost = Callable[[tuple, dict, Any], OpRecord]
_COSTS: dict[Any, Cost] = {}


def register_cost(op: Any) -> Callable[[Cost], Cost]:
    """Register the cost of `op` (an OpOverloadPacket or OpOverload, e.g. a custom op's): a function
    of `(args, kwargs, out)` returning its `OpRecord` (the name and phase are filled in)."""
    def deco(fn: Cost) -> Cost:
        _COSTS[op] = fn
        return fn
    return deco


def nbytes(t: Any) -> int:
    """Bytes of a tensor's elements as its shape says (a view: its own elements, not its storage's)."""
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(tree: Any) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) tensor addresses: stride-0 dims once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


# Ops that move no data: views, allocations, metadata.
_FREE = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.detach,
         aten.alias, aten.lift_fresh, aten._unsafe_view, aten._reshape_alias, aten.set_, aten.resize_,
         aten.unbind, aten.split, aten.split_with_sizes, aten.chunk, aten.sym_size, aten.sym_stride,
         aten.sym_numel, aten.sym_storage_offset, aten.is_same_size, aten._has_compatible_shallow_copy_type}
# Ops that only write their output.
_FILLS = {aten.zeros, aten.ones, aten.full, aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros,
          aten.new_ones, aten.new_full, aten.fill_, aten.zero_, aten.arange, aten.scalar_tensor}
# Ops whose output size depends on the data or that read a value back: a host sync on a GPU.
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.bincount, aten.unique_dim,
            aten._unique, aten._unique2, aten.unique_consecutive, aten.repeat_interleave, aten.equal,
            aten.is_nonzero, aten.item}


def _gather_record(table: torch.Tensor, picked_bytes: int, other: Iterable[torch.Tensor], out: Any) -> OpRecord:
    return OpRecord("", read=sum(nbytes(t) for t in other), written=sum(nbytes(t) for t in _tensors(out)),
                    gathered=picked_bytes, table=nbytes(table))


@register_cost(aten.index_select)
def _index_select(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    return _gather_record(args[0], nbytes(out), [args[2]], out)


@register_cost(aten.gather)
def _gather(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    return _gather_record(args[0], nbytes(out), [args[2]], out)


@register_cost(aten.embedding)
def _embedding(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    return _gather_record(args[0], nbytes(out), [args[1]], out)


def _embedding_bag_cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    weight, indices, offsets = args[0], args[1], args[2]
    psw = args[7] if len(args) > 7 else kwargs.get("per_sample_weights")
    row = weight.shape[1] * weight.element_size() if weight.dim() == 2 else weight.element_size()
    return _gather_record(weight, indices.numel() * row, [indices, offsets] + ([psw] if psw is not None else []),
                          out[0] if isinstance(out, tuple) else out)


def _bag_sum_cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    # trainer.kernels.sparse.bag_sum: an embedding_bag over `runs` runs' rows, one run's at a time.
    table, codes, offsets, weights, runs = args
    row = table.shape[1] * table.element_size()
    return dataclasses.replace(_gather_record(table, codes.numel() * row, [codes, offsets, weights], out),
                               table_parts=max(runs, 1))


register_cost(aten._embedding_bag)(_embedding_bag_cost)
register_cost(aten._embedding_bag_forward_only)(_embedding_bag_cost)


def _scatter_cost(src_pos: int, index_pos: int) -> Cost:
    def cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
        src = args[src_pos] if len(args) > src_pos and isinstance(args[src_pos], torch.Tensor) else None
        index = args[index_pos]
        touched = nbytes(src) if src is not None else index.numel() * args[0].element_size()
        # The touched rows of the target are read (an add) and written; the source and index read.
        return OpRecord("", read=nbytes(src) + nbytes(index) + touched, written=touched)
    return cost


for _op in (aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_, aten.scatter_reduce,
            aten.scatter_reduce_):
    register_cost(_op)(_scatter_cost(3, 2))
for _op in (aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_):
    register_cost(_op)(_scatter_cost(3, 2))


def _addmm_cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    bias, a, b = args[0], args[1], args[2]
    flops = flop_registry[aten.addmm if a.dim() == 2 else aten.baddbmm](bias.shape, a.shape, b.shape)
    if bias.dim() == 1:  # cuBLASLt's bias epilogue: the vector read once, the output written once
        return OpRecord("", flops=flops, dtype=a.dtype, read=nbytes(a) + nbytes(b) + nbytes(bias),
                        written=nbytes(out))
    # The bias is copied into the output (read broadcast, written in full), the GEMM reads it back.
    return OpRecord("", flops=flops, dtype=a.dtype, read=nbytes(a) + nbytes(b) + _stored_bytes(bias) + nbytes(out),
                    written=2 * nbytes(out), launches=2)


register_cost(aten.addmm)(_addmm_cost)
register_cost(aten.baddbmm)(_addmm_cost)


def _fused_adam_cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    params, grads, exp_avgs, exp_avg_sqs = args[:4]
    states = [*params, *exp_avgs, *exp_avg_sqs]
    # With a gradient scale the kernel also writes the unscaled gradient back.
    written = states + (list(grads) if kwargs.get("grad_scale") is not None else [])
    elements = sum(t.numel() for t in params)
    return OpRecord("", read=sum(nbytes(t) for t in [*states, *grads]), written=sum(nbytes(t) for t in written),
                    launches=max(1, math.ceil(elements / (320 * 65536))))


register_cost(aten._fused_adam_)(_fused_adam_cost)
# The tensor-lr overload has no meta kernel in torch: an in-place update has nothing to compute there.
_META = torch.library.Library("aten", "IMPL")
_META.impl("_fused_adam_.tensor_lr", lambda *args, **kwargs: None, "Meta")


def _decoder_row_stats_cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    W, G = args[:2]
    return OpRecord("", read=nbytes(W) + nbytes(G), written=sum(nbytes(t) for t in _tensors(out)))


def _adam_tail_cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    # trainer.kernels.adam_tail.adam_: parameter, gradient and moments read once, the three states
    # written once, plus the small per-run and per-row vectors.
    param, grad, exp_avg, exp_avg_sq, *small = _tensors(args)
    states = nbytes(param) + nbytes(exp_avg) + nbytes(exp_avg_sq)
    return OpRecord("", read=states + nbytes(grad) + sum(nbytes(t) for t in small), written=states)


def _gather_dot_cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    # trainer.kernels.gather_dot: each picked table row read once (the L2 rule over one run's slice of
    # the table, as the entries come grouped by run), the token rows and indices streamed, one output.
    table, ia, rows, ib, k, runs = args
    return OpRecord("", read=nbytes(rows) + nbytes(ia) + nbytes(ib), written=nbytes(out),
                    gathered=ia.numel() * table.shape[1] * table.element_size(), table=nbytes(table),
                    table_parts=max(runs, 1))


def _streaming_cost(args: tuple, kwargs: dict, out: Any) -> OpRecord:
    # An elementwise kernel of trainer.kernels.elementwise_gpu over (R, B, d_sae): each tensor argument
    # read once, its outputs written once; each small (R, d_sae) output is first one row per block of
    # BLOCK_B tokens, written by the kernel and read back by their sum.
    batch = next(t.shape[1] for t in _tensors(args) if t.dim() == 3)
    tiles = math.ceil(batch / trainer.kernels.elementwise_gpu.BLOCK_B)
    partials = tiles * sum(nbytes(t) for t in _tensors(out) if t.dim() < 3)
    return OpRecord("", read=sum(nbytes(t) for t in _tensors(args)) + partials,
                    written=sum(nbytes(t) for t in _tensors(out)) + partials, launches=2)


register_cost(torch.ops.sae.jumprelu_forward)(_streaming_cost)
register_cost(torch.ops.sae.jumprelu_backward)(_streaming_cost)
register_cost(torch.ops.sae.relu_forward)(_streaming_cost)
register_cost(torch.ops.sae.relu_backward)(_streaming_cost)
register_cost(torch.ops.sae.gated_forward)(_streaming_cost)
register_cost(torch.ops.sae.gated_backward)(_streaming_cost)
register_cost(torch.ops.sae.gather_dot)(_gather_dot_cost)
register_cost(torch.ops.sae.bag_sum)(_bag_sum_cost)
register_cost(torch.ops.sae.decoder_row_stats)(_decoder_row_stats_cost)
register_cost(torch.ops.sae.adam_)(_adam_tail_cost)


def default_cost(func: Any, args: tuple, kwargs: dict, out: Any) -> OpRecord:
    """An op that reads each of its tensor inputs once and writes its outputs (in place: the target
    read and written). Matmuls get their FLOPs from torch.utils.flop_counter."""
    packet = func.overloadpacket
    if packet in _FREE or func.is_view:
        return OpRecord("", launches=0)
    inputs = _tensors((args, kwargs))
    outputs = _tensors(out)
    if packet in _FILLS:
        return OpRecord("", written=sum(nbytes(t) for t in outputs))
    flops, dtype = 0.0, None
    if packet in flop_registry:
        shapes = [t.shape if isinstance(t, torch.Tensor) else t for t in args]
        flops = flop_registry[packet](*shapes, **{k: v for k, v in kwargs.items() if k != "out"},
                                      out_val=out)
        dtype = inputs[0].dtype if inputs else None
    elements = sum(t.numel() for t in outputs) or sum(t.numel() for t in inputs)
    # multi_tensor_apply (the _foreach ops) launches one kernel per ~20M elements.
    launches = max(1, math.ceil(elements / (320 * 65536))) if packet.__name__.startswith("_foreach") else 1
    return OpRecord("", flops=flops, dtype=dtype, read=sum(nbytes(t) for t in inputs),
                    written=sum(nbytes(t) for t in outputs), launches=launches)


@dataclass
class Trace:
    """What a traced stretch of code dispatched, and the live memory over it."""

    ops: list[OpRecord] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)
    """Ops that would make the host wait for a GPU."""
    live: int = 0
    """Bytes of storages alive now (those registered with `hold` and those the traced ops made)."""
    peak: int = 0
    """The largest `live` seen."""
    phase: str = ""

    def total(self, attr: str, phase: str | None = None) -> float:
        return sum(getattr(o, attr) for o in self.ops if phase is None or o.phase == phase)


class StepTracer(TorchDispatchMode):
    """Records every aten op dispatched inside it (`Trace.ops`) and the live bytes of the storages
    that exist: those registered with `hold` before, and every op's new outputs until they die."""

    def __init__(self) -> None:
        super().__init__()
        self.trace = Trace()
        self._held: dict[int, Any] = {}

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count these tensors' storages as live (they existed before the traced code ran)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()  # the same Python object for a storage while it lives
        key = id(st)
        if key in self._held:
            return
        size = st.nbytes()
        self._held[key] = weakref.finalize(st, self._free, key, size)
        self.trace.live += size
        self.trace.peak = max(self.trace.peak, self.trace.live)

    def _free(self, key: int, size: int) -> None:
        self._held.pop(key, None)
        self.trace.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            self.trace.syncs.append(str(func))
        cost = _COSTS.get(func) or _COSTS.get(packet)
        rec = cost(args, kwargs, out) if cost is not None else default_cost(func, args, kwargs, out)
        if torch._C._current_graph_task_id() != -1:
            self.trace.phase = "backward"
        elif self.trace.phase == "backward":
            self.trace.phase = "update"  # clipping, Adam, the decoder constraint, after_step
        rec.name, rec.phase = str(packet).removeprefix("aten."), self.trace.phase
        if rec.launches or rec.read or rec.written:
            self.trace.ops.append(rec)
        for t in _tensors(out):
            self._track(t)
        return out


# -- CUDA's autocast, applied by hand on the meta device -----------------------------------------

# torch's CUDA autocast lists (aten/src/ATen/autocast_mode.cpp), by the name a Python call has.
_TO_LOWER = {"mm", "bmm", "baddbmm", "addmm", "addbmm", "matmul", "einsum", "linear", "__matmul__", "__rmatmul__",
             "addmv", "mv", "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d"}
_TO_FP32 = {"pow", "__pow__", "__rpow__", "sum", "prod", "cumsum", "cumprod", "exp", "expm1", "log", "log1p", "log2",
            "log10", "norm", "mse_loss", "softmax", "log_softmax", "reciprocal", "rsqrt", "layer_norm", "group_norm",
            "cdist", "dist", "renorm", "logsumexp", "softplus", "__rtruediv__", "__rdiv__", "normalize", "cosh",
            "sinh", "tan", "acos", "asin", "erfinv", "l1_loss", "smooth_l1_loss"}
_PROMOTE = {"addcmul", "addcdiv", "scatter_add", "index_put", "dot", "cross", "atan2", "tensordot"}


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast to `dtype` at the Python level, for tensors that autocast cannot reach (meta):
    floating tensors going into a matmul are cast to `dtype` (a parameter once per region, as
    autocast's weight cache), those going into the float32 list are cast to float32, and the
    promote list casts to the widest input. In-place and `out=` calls are left alone, as autocast
    leaves them."""

    active = 0
    """How many are entered (`trainer.precision.autocast_enabled` on the meta device)."""
    dtypes: list[torch.dtype] = []
    """Their dtypes, innermost last (`trainer.precision.autocast_dtype`)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "MetaAutocast":
        MetaAutocast.active += 1
        MetaAutocast.dtypes.append(self.dtype)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        MetaAutocast.active -= 1
        MetaAutocast.dtypes.pop()
        self._cache.clear()
        return super().__exit__(*exc)

    def _cast(self, t: Any, dtype: torch.dtype) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        if t.is_leaf and t.requires_grad and torch.is_grad_enabled():
            key = id(t)
            if key not in self._cache:
                self._cache[key] = t.to(dtype)
            return self._cache[key]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if "out" not in kwargs and not name.endswith("_") or name.startswith("__"):
            if name in _TO_LOWER:
                args, kwargs = self._cast_all(args, kwargs, self.dtype)
            elif name in _TO_FP32 and any(isinstance(t, torch.Tensor) and t.dtype == self.dtype
                                          for t in tree_flatten((args, kwargs))[0]):
                args, kwargs = self._cast_all(args, kwargs, torch.float32)
            elif name in _PROMOTE:
                floats = [t.dtype for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.is_floating_point()]
                if floats:
                    widest = max(floats, key=lambda d: torch.finfo(d).bits)
                    args, kwargs = self._cast_all(args, kwargs, widest)
        return func(*args, **kwargs)

    def _cast_all(self, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
        def cast(v: Any) -> Any:
            if isinstance(v, (list, tuple)):
                return type(v)(cast(u) for u in v)
            return self._cast(v, dtype)
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


# -- a training step, replayed ----------------------------------------------------------------------

def resolved_kernels(model: torch.nn.Module, precision: str, device_type: str = "cuda", kernels: str = "auto") -> str:
    """`kernels` as the step resolves it for `model` on `device_type` at `precision`: fused or plain."""
    if kernels != "auto":
        return kernels
    auto_fused = getattr(model, "auto_fused", None)
    return "fused" if auto_fused is not None and auto_fused(device_type, precision == "bf16") else "plain"


def assume_dead(fraction: float) -> Callable[[torch.nn.Module], None]:
    """`prepare` for `replay_step`: the host's lagged view of the dead latents says `fraction` of each
    run's latents are dead (AuxK takes part), or none (0: AuxK must add no op)."""
    def prepare(model: torch.nn.Module) -> None:
        if hasattr(model, "assume_dead_for_replay"):
            model.assume_dead_for_replay(fraction)
    return prepare


def replay_step(model: torch.nn.Module, cfg: Any, batch: int, precision: str = "bf16",
                prepare: Callable[[torch.nn.Module], None] | None = None, device_type: str = "cuda") -> Trace:
    """Trace one `StackTrainer.train_step` of `model` (built on the meta device) on a batch of `batch`
    rows, with the code path and dtypes `device_type` takes at `precision` (its kernels as `cfg.kernels`
    resolves there; the chunked passes and BatchTopK's selection take their GPU forms on the meta device
    either way). `cfg` is the loop's LoopConfig (its `kernels` and `precision` are set here).

    One step is taken untraced first (what a run has made by then exists); `prepare(model)`, called
    before it and again after it, sets the state to trace from (e.g. which latents are dead). Then
    the traced step, with what a training loop holds while it runs counted live: parameters,
    buffers, optimizer state, the batch and the previous step's output."""
    from dataclasses import replace

    from trainer.train import StackTrainer

    cfg = replace(cfg, precision=precision, kernels=resolved_kernels(model, precision, device_type, cfg.kernels))
    trainer = StackTrainer(model, cfg)
    d_in, d_out = model.W_enc.shape[1], model.W_dec.shape[2]
    x = torch.empty(batch, d_in, device="meta")
    target = torch.empty(batch, d_out, device="meta") if getattr(model, "is_transcoder", False) else None
    if prepare is not None:
        prepare(model)
    previous = trainer.train_step(x, target)
    if prepare is not None:
        prepare(model)
    tracer = StepTracer()
    tracer.hold([*model.parameters(), *model.buffers(), *trainer.opt.exp_avg.values(),
                 *trainer.opt.exp_avg_sq.values(), *_tensors(previous), x, target])
    tracer.trace.phase = "forward"
    with tracer:
        trainer.train_step(x, target)
    return tracer.trace
