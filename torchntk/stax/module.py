"""`Layer`: the base of every torchntk module.

A layer is a `torch.nn.Module` whose `forward` is the finite-width network and
whose `kernel_rule` maps the `Kernel` of its inputs to the `Kernel` of its
outputs in the infinite-width limit. `kernel_fn` evaluates the rule of a whole
network on raw inputs or on a `Kernel`.

Masking (neural-tangents' `mask_constant`): input entries equal to a constant
are masked, e.g. the padding of variable-length sequences. Each layer declares
how masks pass through it (`mask_rule`) and whether its outputs at masked
positions are zeroed (`remask`); the few layers that average over positions
(`GlobalAvgPool`, `LayerNorm`) leave masked positions out of the average.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Sequence, Union

import torch
from torch import nn

from ..checks import (all_finite, check_flag, check_input_values, check_mask_constant,
                      type_name)
from ..kernel import Kernel, Shape, input_mask, kernel_from_inputs
from ..ops.conv_chain import ChainStep
from ..ops.heap import reuse_heap
from ..outputs import KERNEL_FIELDS
from .requirements import Requirements, report_input_kernels, resolve_layout

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]
Kernels = Union[Kernel, Sequence[Kernel]]
Shapes = Union[Shape, Sequence[Shape]]
Masks = Union[torch.Tensor, None, Sequence[Union[torch.Tensor, None]]]

# Whether a layer's forward is running in this thread (its sublayers' calls are not outermost).
_FORWARD = threading.local()


class Layer(nn.Module):
    """Base class: a finite-width `forward` and an infinite-width `kernel_rule`.

    Subclasses implement `forward`, `kernel_rule`, and, when they change shapes
    or hold parameters, `output_shape` and `init_parameters`; for masked
    inputs, `mask_rule` and `remask` when masks do not simply pass through,
    and `forward_with_mask` when the finite layer itself uses the mask.
    """

    #: Whether covariances (and, in `forward_with_mask`, outputs) at masked
    #: output positions are set to zero after this layer: true for layers that
    #: would otherwise give them a nonzero value, such as a bias
    #: (neural-tangents' `remask_kernel`).
    remask: bool = False

    @property
    def requirements(self) -> Requirements:
        """What this layer needs of its input: the kernel's layout, a Gaussian
        input kernel, the axes its forward couples (see `Requirements`)."""
        return Requirements()

    def kernel_rule(self, k: Kernels) -> Kernels:
        """Map the input kernel to the output kernel (subclasses override)."""
        raise TypeError(f"{type(self).__name__} has no kernel rule")

    def output_shape(self, input_shape: Shapes) -> Shapes:
        """Shape of the finite-width output for an input of `input_shape`."""
        return input_shape

    def init_parameters(self, input_shape: Shapes, generator: torch.Generator | None = None,
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Shapes:
        """(Re)initialize parameters for inputs of `input_shape`, return the output shape.

        Draws come from `generator` (the global generator when `None`), so two
        calls with generators in the same state give the same network.
        """
        return self.output_shape(input_shape)

    def mask_rule(self, mask: Masks, input_shape: Shapes) -> Masks:
        """Mask of the outputs given the mask of the inputs (`True`: masked),
        both broadcastable to the activations (for fan-in layers lists, with
        `None` for a branch without a mask); by default it passes unchanged."""
        return mask

    @property
    def chain_step_kind(self) -> type[ChainStep] | None:
        """The record class of this layer's step in a fused chain
        (`torchntk.ops.conv_chain`; `torchntk.stax.fusion` runs them), or
        `None` (the default) where the layer never joins one."""
        return None

    def chain_step(self, input_shape: Shape) -> ChainStep | None:
        """This layer's rule as a step of a fused chain, a record of
        `chain_step_kind`, for inputs of `input_shape`; `None` where it cannot
        join for these inputs (its own `kernel_rule` runs instead)."""
        return None

    def propagate(self, k: Kernels) -> Kernels:
        """Check `k` against this layer's needs, apply `kernel_rule`, then the masks."""
        kernels = [k] if isinstance(k, Kernel) else k
        report_input_kernels(self, kernels)
        if self.requirements.gaussian_input:
            for kernel in kernels:
                if not kernel.is_gaussian:
                    raise ValueError(
                        f"{self._name()}: the input kernel is not Gaussian; this layer needs "
                        "an affine layer (Dense, Conv) right before it, also when it would "
                        "act on the network's inputs (fixed values, not Gaussian)")
        return self.propagate_masks(k, self.kernel_rule(k))

    def propagate_masks(self, k_in: Kernels, k_out: Kernels) -> Kernels:
        """Give `k_out` the masks `mask_rule` makes of those of `k_in`, zeroing
        the covariances of masked positions if `remask`."""
        ins = [k_in] if isinstance(k_in, Kernel) else list(k_in)
        if all(k.mask1 is None for k in ins):
            return k_out

        def output_masks(masks: list, shapes: list) -> Masks:
            if all(m is None for m in masks):
                return None
            if isinstance(k_in, Kernel):
                return self.mask_rule(masks[0], shapes[0])
            return self.mask_rule(masks, shapes)

        mask1 = output_masks([k.mask1 for k in ins], [k.shape1 for k in ins])
        mask2 = output_masks([k.mask2 for k in ins], [k.shape2 for k in ins])
        if isinstance(k_out, Kernel):
            return self._with_masks(k_out, mask1, mask2)
        mask2s = [None] * len(k_out) if mask2 is None else mask2
        return type(k_out)(self._with_masks(k, m1, m2) for k, m1, m2 in zip(k_out, mask1, mask2s))

    def _with_masks(self, k: Kernel, mask1: torch.Tensor | None,
                    mask2: torch.Tensor | None) -> Kernel:
        if self.remask:
            return k.masked(mask1, mask2, self._name())
        return k.replace(mask1=mask1, mask2=mask2)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`forward`; an outermost call (not one inside another layer's forward)
        first checks its input `x` as `kernel_fn` does: a tensor (or a list of
        them) with finite values (NaN or inf raise a `ValueError`: some layers,
        such as `Sign`, would turn them into finite outputs). Not while
        torch.compile traces or torch.func transforms (the empirical kernels)
        run, where a check on values cannot be made."""
        if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or getattr(_FORWARD, 'running', False)):
            return super().__call__(*args, **kwargs)
        if args:
            _check_forward_input(args[0], self._name())
        _FORWARD.running = True
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _FORWARD.running = False

    def forward_with_mask(self, x: Tensors, mask: Masks) -> tuple[Any, Masks]:
        """The finite network on inputs with a mask (`True`: masked), returning
        the outputs and their mask. Outputs at masked positions are zeroed after
        a layer with `remask`, so the network is the one whose infinite-width
        limit `kernel_fn(..., mask_constant=...)` computes."""
        outputs = self(x)
        if mask is None or (not isinstance(mask, torch.Tensor) and all(m is None for m in mask)):
            return outputs, None
        input_shape = x.shape if isinstance(x, torch.Tensor) else [t.shape for t in x]
        out_mask = self.mask_rule(mask, input_shape)
        if self.remask:
            outputs = torch.where(out_mask, 0., outputs)
        return outputs, out_mask

    def forward_masked(self, x: Tensors, mask_constant: float) -> tuple[Any, Masks]:
        """The finite network with the entries of `x` equal to `mask_constant`
        masked (neural-tangents' `apply_fn(..., mask_constant=...)`).

        Returns the outputs and their mask (`True`: masked); masked inputs
        count as zeros. See `forward_with_mask`.
        """
        check_mask_constant(mask_constant, self._name(), allow_none=False)
        if isinstance(x, torch.Tensor):
            mask = input_mask(x, mask_constant)
            return self.forward_with_mask(torch.where(mask, 0., x), mask)
        masks = [input_mask(t, mask_constant) for t in x]
        return self.forward_with_mask(type(x)(torch.where(m, 0., t) for t, m in zip(x, masks)),
                                      type(x)(masks))

    def kernel_fn(self, x1: Tensors | Kernels, x2: Tensors | None = None,
                  get: str | Sequence[str] | None = None, *,
                  diagonal_batch: bool | None = None,
                  diagonal_spatial: bool | None = None,
                  mask_constant: float | None = None) -> Any:
        """NNGP and NTK kernels of the infinite-width limit of this network.

        Args:
            x1: inputs `(N1, C, *S)` (or a sequence of such for a network with
                several inputs), or a `Kernel` to propagate further.
            x2: inputs `(N2, C, *S)`, or `None` for `x2 = x1`. An `x2` equal to
                `x1` entry for entry gives the `x2=None` kernel, with `cov2`
                and `mask2` those of `x1` (unless `x2` is a distinct tensor
                that requires grad).
            get: `'nngp'`, `'ntk'`, any other `Kernel` field, a tuple of names
                (returns a named tuple), or `None` (the whole `Kernel`).
            diagonal_batch, diagonal_spatial: `None` picks the cheapest
                layout that holds the whole kernel; `False` forces full
                covariances; `diagonal_spatial=True` keeps only same-position
                covariances, also for outputs with spatial axes (an error names
                the layers that mix positions where that is not possible).
            mask_constant: input entries equal to it (NaN allowed) are masked,
                e.g. padding; `None` for no masking. Masked entries count as
                zeros, layers propagate the masks (`Kernel.mask1`, `mask2`), and
                global average pooling and `LayerNorm` average over unmasked
                positions only.

        Shape:
            `nngp`, `ntk`: `(N1, N2)` for flat outputs, `(N1, N2, X, X', …)`
            for outputs with spatial axes (`(N1, N2, X, …)` with
            `diagonal_spatial=True`). A batch of no examples (`N1 = 0` or
            `N2 = 0`) gives kernels of no entries on that side.
        """
        with reuse_heap():
            return self._kernel_fn(x1, x2, get, diagonal_batch, diagonal_spatial, mask_constant)

    def _kernel_fn(self, x1: Tensors | Kernels, x2: Tensors | None,
                   get: str | Sequence[str] | None, diagonal_batch: bool | None,
                   diagonal_spatial: bool | None, mask_constant: float | None) -> Any:
        caller = f"{self._name()}.kernel_fn"
        names = KERNEL_FIELDS.names(get, caller)
        check_flag(diagonal_batch, 'diagonal_batch', caller, allow_none=True)
        check_flag(diagonal_spatial, 'diagonal_spatial', caller, allow_none=True)
        empty1 = empty2 = False   # whether x1, x2 are batches of no examples
        same_inputs = False   # whether x2 was given equal to x1, entry for entry
        if isinstance(x1, Kernel) or _is_kernel_sequence(x1):
            if (x2 is not None or diagonal_batch is not None or diagonal_spatial is not None
                    or mask_constant is not None):
                raise ValueError(f"{self._name()}: x2, diagonal_batch, diagonal_spatial and "
                                 "mask_constant must be None when x1 is a Kernel (its layout and "
                                 "masks are already fixed)")
            k = x1
        else:
            check_mask_constant(mask_constant, self._name())
            diagonal_batch, diagonal_spatial = resolve_layout(
                self.requirements, diagonal_batch, diagonal_spatial, self._name(), self.modules())
            compute_ntk = names is None or 'ntk' in names
            # The x2=None kernel, whose same-example pairs are the variances' own numbers:
            # computed apart they can differ by an ulp, which the arc-cosine maps (infinite
            # slope at correlation 1) turn into √ulp.
            same_inputs = x2 is not None and _equal_inputs(x1, x2, mask_constant)
            x2 = None if same_inputs else x2
            x1, empty1 = _stand_in_for_empty_batch(x1, mask_constant)
            x2, empty2 = _stand_in_for_empty_batch(x2, mask_constant)
            k = _inputs_to_kernels(x1, x2, self._name(), diagonal_batch=diagonal_batch,
                                   diagonal_spatial=diagonal_spatial, compute_ntk=compute_ntk,
                                   mask_constant=mask_constant)
        k = self.propagate(k)
        if empty1 or empty2:
            k = _emptied(k, empty1, empty1 if x2 is None else empty2)
        if same_inputs:
            k = _with_x2_fields(k)
        if isinstance(k, Kernel):
            return KERNEL_FIELDS.select(k, get, caller)
        return type(k)(KERNEL_FIELDS.select(kernel, get, caller) for kernel in k)

    def _name(self) -> str:
        return type(self).__name__


def _equal_inputs(x1: Any, x2: Any, mask_constant: float | None) -> bool:
    """Whether `x2` holds the inputs of `x1` (tensor by tensor for a network
    with several inputs): the same shapes, dtypes and devices, equal entries,
    and so the same masks. A distinct `x2` that needs its own gradient is
    never the same (the x2=None kernel would give it none)."""
    if isinstance(x1, torch.Tensor):
        pairs = [(x1, x2)]
    elif isinstance(x1, (list, tuple)) and isinstance(x2, (list, tuple)) and len(x1) == len(x2):
        pairs = list(zip(x1, x2))
    else:
        return False
    return all(a is b or _equal_tensors(a, b, mask_constant) for a, b in pairs)


def _equal_tensors(a: Any, b: Any, mask_constant: float | None) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if (a.shape != b.shape or a.dtype != b.dtype or a.device != b.device
            or a.device.type == 'meta' or a.is_complex() or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))):
        return False
    if mask_constant is not None and math.isnan(mask_constant) and a.is_floating_point():
        # NaN != NaN, but NaN padding at the same entries is the same padding.
        a, b = (t.nan_to_num(0., math.inf, -math.inf) for t in (a, b))
    return torch.equal(a, b)


def _with_x2_fields(k: Kernels) -> Kernels:
    """The x2=None kernel `k` as the kernel of `x2 = x1`: `cov2` and `mask2` are
    those of `x1`, as a call with a distinct `x2` returns them."""
    if not isinstance(k, Kernel):
        return type(k)(_with_x2_fields(kernel) for kernel in k)
    return k.replace(cov2=k.cov1, mask2=k.mask1)


def _is_kernel_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(e, Kernel) for e in x)


def _inputs_to_kernels(x1: Tensors, x2: Tensors | None, caller: str, **layout: Any) -> Kernels:
    if isinstance(x1, torch.Tensor):
        if x2 is not None and not isinstance(x2, torch.Tensor):
            raise TypeError(f"{caller}: x2 must be a torch.Tensor like x1 (or None), got "
                            f"{type_name(x2)}")
        return kernel_from_inputs(*_checked_inputs(x1, x2, caller, layout['mask_constant']),
                                  **layout)
    if not isinstance(x1, (list, tuple)):
        raise TypeError(f"{caller}: x1 must be a torch.Tensor (or a list or tuple of them for "
                        f"a network with several inputs), got {type_name(x1)}")
    if x2 is not None and not isinstance(x2, (list, tuple)):
        raise TypeError(f"{caller}: x2 must be a list or tuple of tensors like x1 (or None), "
                        f"got {type_name(x2)}")
    x2s = [None] * len(x1) if x2 is None else list(x2)
    if len(x2s) != len(x1):
        raise ValueError(f"{caller}: x1 has {len(x1)} inputs but x2 has {len(x2s)}")
    return type(x1)(_inputs_to_kernels(a, b, caller, **layout) for a, b in zip(x1, x2s))


def _stand_in_for_empty_batch(x: Tensors | None, mask_constant: float | None) -> tuple[Any, bool]:
    """`x`, or for a batch of no examples (every input of `(0, C, *S)`) one
    example of unmasked ones in its place, and whether it was empty. Layers
    need not handle empty batches: `_emptied` cuts the stand-in's kernel to
    no examples, with the shapes, dtype and device of the empty batch's."""
    tensors = [x] if isinstance(x, torch.Tensor) else x if isinstance(x, (list, tuple)) else []
    if not tensors or not all(isinstance(t, torch.Tensor) and t.ndim >= 2 and len(t) == 0
                              for t in tensors):
        return x, False
    fill = 2. if mask_constant == 1. else 1.
    stand_ins = [t.new_full((1, *t.shape[1:]), fill) for t in tensors]
    return (stand_ins[0] if isinstance(x, torch.Tensor) else type(x)(stand_ins)), True


def _emptied(k: Kernels, empty1: bool, empty2: bool) -> Kernels:
    """The kernel of `_stand_in_for_empty_batch`'s examples cut to no examples
    on the sides that were empty: `(0, N2, …)`, `(N1, 0, …)` or `(0, 0, …)`."""
    if not isinstance(k, Kernel):
        return type(k)(_emptied(kernel, empty1, empty2) for kernel in k)
    return k.slice_examples(slice(0 if empty1 else None), slice(0 if empty2 else None))


def _check_forward_input(x: Any, caller: str) -> None:
    """What `Layer.__call__` checks of the input of an outermost call."""
    tensors = [x] if isinstance(x, torch.Tensor) else x if isinstance(x, (list, tuple)) else None
    if tensors is None or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"{caller}: x must be a torch.Tensor (or a list or tuple of them for a "
                        f"network with several inputs), got {type_name(x)}")
    for t in tensors:
        if t.is_floating_point() and t.device.type != 'meta' and not all_finite(t):
            raise ValueError(f"{caller}: x contains non-finite values (NaN or inf); for "
                             "padding, use forward_masked with a mask_constant")


def _checked_inputs(x1: torch.Tensor, x2: torch.Tensor | None, caller: str,
                    mask_constant: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate inputs at the public boundary; integer inputs become floating.
    Masked entries may be non-finite (a NaN or infinite `mask_constant`)."""
    for name, x in (('x1', x1), ('x2', x2)):
        if x is None:
            continue
        check_input_values(x, name, caller, mask_constant)
        if x.ndim < 2:
            raise ValueError(f"{caller}: {name} must have shape (N, C, *spatial), got {tuple(x.shape)}")
    if x2 is not None:
        if x1.shape[1:] != x2.shape[1:]:
            raise ValueError(f"{caller}: x1 and x2 must agree in all but the batch axis, got "
                             f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}")
        if x1.dtype != x2.dtype or x1.device != x2.device:
            raise ValueError(f"{caller}: x1 and x2 must have the same dtype and device, got "
                             f"{x1.dtype}/{x1.device} and {x2.dtype}/{x2.device}")
    if not x1.is_floating_point():
        x1 = x1.to(torch.get_default_dtype())
        x2 = None if x2 is None else x2.to(x1.dtype)
    return x1, x2
