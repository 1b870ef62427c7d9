r"""A small QAT training loop: the user's DataLoader and loss, an optimizer, epochs, warm-up.

The learning rate follows a linear warm-up then a cosine decay, per step (MQBench trains QAT
with cosine decay and recommends warm-up when BN is folded)::

    lr(t) = lr * t / T_w                                   for t <  T_w
    lr(t) = lr * 0.5 * (1 + cos(pi * (t - T_w) / (T - T_w)))  for t >= T_w

with ``T`` the total and ``T_w`` the warm-up steps. With ``quant_lr`` the parameters of the
fake-quant modules (scales, zero points, clips) get their own learning rate, scaled to each
parameter's magnitude (``quant_lr * mean|p|``: a step moves a scale by about ``quant_lr`` of
itself whatever the data's units), and no weight decay; the weights keep ``lr``, which for a
pretrained model should be small (Adam, 1e-5). Under ``torchrun`` (a process group
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
    quant_lr: float | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
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
        quant_lr: Learning rate of the fake-quant parameters relative to their magnitude
            (None: they train with ``lr`` like the weights).
        on_epoch: Called after each epoch with the epoch number (from 1) and its mean loss,
            the model in eval mode (e.g. to score it on held-out data and keep the best state).

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
    params = parameter_groups(model, lr, weight_decay, quant_lr)
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
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch + 1, history[-1])
    model.eval()
    return history


def parameter_groups(model: nn.Module, lr: float, weight_decay: float,
                     quant_lr: float | None) -> list[dict]:
    """The optimizer's parameter groups: the weights, then one group per quantizer parameter.

    Without ``quant_lr`` every trainable parameter is in one group with ``lr``.
    """
    from qtool.qat.fake_quant import FakeQuantize

    trainable = [p for p in model.parameters() if p.requires_grad]
    if quant_lr is None:
        return [{"params": trainable, "lr": lr, "weight_decay": weight_decay}]
    quant: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    quant.setdefault(id(p), p)
    groups = [{"params": [p for p in trainable if id(p) not in quant], "lr": lr,
               "weight_decay": weight_decay}]
    for p in quant.values():
        magnitude = float(p.detach().abs().mean()) or 1.0
        groups.append({"params": [p], "lr": quant_lr * magnitude, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


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


__all__ = ["OPTIMIZERS", "fit", "parameter_groups", "warmup_cosine"]
