r"""A small QAT training loop: the user's DataLoader and loss, an optimizer, epochs, warm-up.

The learning rate follows a linear warm-up then a cosine decay, per step (MQBench trains QAT
with cosine decay and recommends warm-up when BN is folded)::

    lr(t) = lr * t / T_w                                   for t <  T_w
    lr(t) = lr * 0.5 * (1 + cos(pi * (t - T_w) / (T - T_w)))  for t >= T_w

with ``T`` the total and ``T_w`` the warm-up steps. Under ``torchrun`` (a process group
initialised) the model is wrapped in ``DistributedDataParallel`` and the sampler's epoch is
set, so the same call trains data-parallel; give the DataLoader a ``DistributedSampler``.
Users with their own loop skip this module: the imported model is a plain ``nn.Module``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from qtool.errors import PlanError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``t`` (for ``torch.optim.lr_scheduler.LambdaLR``)."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))

    return factor


def fit(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[..., torch.Tensor],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    warmup_epochs: float = 1.0,
    find_unused_parameters: bool = False,
) -> list[float]:
    """Train ``model`` in place.

    Args:
        model: The model (a :class:`qtool.qat.QatModel` or any ``nn.Module``).
        loader: Re-iterable batches ``(inputs, target)``; ``inputs`` a tensor, a tuple of
            them or a dict by input name.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``.
        epochs: Passes over ``loader``.
        lr: Peak learning rate.
        optimizer: ``adam`` or ``sgd``.
        momentum: SGD momentum.
        weight_decay: L2 on every parameter (scales, PACT's alpha included).
        warmup_epochs: Linear warm-up length in epochs (may be fractional; 0 for none).
        find_unused_parameters: Passed to DistributedDataParallel.

    Returns:
        The mean loss of each epoch (this process's batches).

    Raises:
        PlanError: Unknown optimizer, or an empty loader.
    """
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {optimizer!r}",
                        f"choose one of {', '.join(OPTIMIZERS)}")
    steps_per_epoch = _length(loader)
    if steps_per_epoch == 0:
        raise PlanError("the training data is empty", "give at least one batch")
    prepare = getattr(model, "prepare_inputs", None)
    runner = _distributed(model, find_unused_parameters)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = steps_per_epoch * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total, round(warmup_epochs * steps_per_epoch))
    )
    history = []
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        runner.train()
        losses = []
        for inputs, target in loader:
            inputs = prepare(inputs) if prepare else _as_tuple(inputs)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(runner(*inputs), target)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
        history.append(sum(losses) / max(1, len(losses)))
        log.info("epoch %d/%d: loss %.4f, lr %.2e", epoch + 1, epochs, history[-1],
                 schedule.get_last_lr()[0])
    model.eval()
    return history


def _distributed(model: nn.Module, find_unused_parameters: bool) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when a process group is running."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def _length(loader) -> int:
    try:
        return len(loader)
    except TypeError:
        return sum(1 for _ in loader)


def _as_tuple(batch):
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


__all__ = ["OPTIMIZERS", "fit", "warmup_cosine"]
