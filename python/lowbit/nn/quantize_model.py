"""``lowbit.quantize_model``: swap the ``nn.Linear`` layers of a model for ``lowbit.Linear``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ._layouts import get_layout
from .bitlinear import BitLinear
from .linear import Linear

_FN = "lowbit.quantize_model"


def _skip_matcher(skip: str | Iterable[str]) -> Callable[[str], bool]:
    entries = (skip,) if isinstance(skip, str) else tuple(skip)
    for e in entries:
        if not isinstance(e, str) or not e:
            raise TypeError(f"{_FN}: skip entries must be non-empty strings, got {e!r}")

    def skipped(name: str) -> bool:
        last = name.rsplit(".", 1)[-1]
        return any(e == name or e == last or name.startswith(e + ".") for e in entries)

    return skipped


def quantize_model(
    model: nn.Module,
    fmt: str,
    *,
    skip: str | Iterable[str] = (),
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    **options: Any,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (recursively, in place) by
    ``lowbit.Linear.from_linear(layer, fmt, **options)``; return ``model``.

    ``skip`` entries name layers to keep in float: a qualified name (``"layers.0.mlp.up"``),
    a last component (``"lm_head"``, matching it anywhere) or a submodule prefix
    (``"vision"`` skips everything under ``vision.``). ``filter_fn(module, name)``, if
    given, must also return True for a layer to be quantized.

    Every layer is checked before any is replaced: a layer whose shape the format cannot
    take (e.g. ``in_features`` not divisible by ``group_size``) raises ``ValueError`` naming
    it, and the model is left unchanged. With ``fmt="ternary"`` ``lowbit.BitLinear``
    layers are converted too (with their own ``per_row``). A layer held under several
    names stays shared. Left in float, by design: the projections inside
    ``nn.MultiheadAttention`` (it reads their weights directly, not through ``forward``).
    A model whose root is an ``nn.Linear`` returns the new ``lowbit.Linear``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
    layout = get_layout(fmt, _FN)
    opts = layout.options(options, _FN)
    skipped = _skip_matcher(skip)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{_FN}: filter_fn must be callable, got {type(filter_fn).__name__}")

    def wanted(module: nn.Module, name: str) -> bool:
        if isinstance(module, BitLinear):
            if layout.name != "ternary":
                return False
            if "per_row" in options and options["per_row"] != module.per_row:
                raise ValueError(
                    f"{_FN}: BitLinear {name!r} was trained with per_row={module.per_row}, "
                    f"got per_row={options['per_row']}"
                )
        elif not isinstance(module, nn.Linear):
            return False
        if skipped(name):
            return False
        return filter_fn is None or bool(filter_fn(module, name))

    # (parent, attribute, qualified name, layer) for every place a layer to replace sits.
    sites: list[tuple[nn.Module | None, str, str, nn.Module]] = []
    if wanted(model, ""):
        sites.append((None, "", "", model))
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for attr, child in parent._modules.items():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if child is not None and wanted(child, name):
                sites.append((parent, attr, name, child))

    errors = []
    for _, _, name, layer in sites:
        if isinstance(layer, nn.Linear):
            reason = layout.shape_error(layer.in_features, layer.out_features, layout.finalize(opts, layer.in_features))
            if reason is not None:
                errors.append((name or "<root>", layer, reason))
    if errors:
        listing = "; ".join(f"{n!r} (in_features={m.in_features}, out_features={m.out_features}): {r}" for n, m, r in errors)
        names = ", ".join(repr(n) for n, _, _ in errors)
        raise ValueError(
            f"{_FN}: cannot store as {layout.name}: {listing}. Keep {'it' if len(errors) == 1 else 'them'} "
            f"in float with skip=[{names}] or choose other options"
        )

    done: dict[int, nn.Module] = {}
    for parent, attr, _, layer in sites:
        if id(layer) not in done:
            if isinstance(layer, BitLinear):
                done[id(layer)] = layer.to_lowbit()
            else:
                done[id(layer)] = Linear.from_linear(layer, layout.name, **opts)
        if parent is None:
            return done[id(layer)]
        setattr(parent, attr, done[id(layer)])
    return model
