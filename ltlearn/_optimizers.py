"""Adam, AdamW and SGD steps on torch's ``_foreach`` primitives, for the training loop.

Why not ``torch.optim``: constructing a ``torch.optim.Optimizer`` imports
``torch._dynamo`` (and sympy) on first use, about 1.2 to 2 seconds that every
fresh process (script, CLI call, joblib worker) paid inside its first ``fit``,
three times the fit itself on CIFAR-10-LT. These steps follow the update
rules of torch 2.x's ``Adam`` (L2 penalty added to the gradient), ``AdamW``
(decoupled decay) and ``SGD`` (momentum, Nesterov), without AMSGrad,
maximisation or complex numbers, which the loop never uses; the tests check
them against ``torch.optim`` to 1e-6 over many steps.
"""

import math

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")


class ForeachOptimizer:
    """An optimizer over parameter groups ``{"params": [...], "weight_decay": float}``.

    ``step(lr)`` applies one update with the learning rate of that step, so a
    schedule is a plain function of the step number.

    Parameters
    ----------
    kind : {"adam", "adamw", "sgd"}
    groups : list of dict
        Each with ``params`` (tensors with ``.grad``) and ``weight_decay``,
        and optionally ``lr_scale``, the group's factor on ``lr`` (default 1).
    betas : (float, float), default=(0.9, 0.999)
        Adam's moment decay rates.
    eps : float, default=1e-8
        Adam's denominator term.
    momentum : float, default=0.9
        SGD's momentum, with Nesterov's correction.

    Examples
    --------
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = ForeachOptimizer("sgd", [{"params": [w], "weight_decay": 0.0}])
    >>> w.sum().backward()
    >>> opt.step(lr=0.1)  # Nesterov: w -= lr * (g + momentum * g)
    >>> w.detach()
    tensor([0.8100, 0.8100])
    """

    def __init__(self, kind, groups, *, betas=(0.9, 0.999), eps=1e-8, momentum=0.9):
        if kind not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}; got {kind!r}.")
        self.kind, self.betas, self.eps, self.momentum = kind, betas, eps, momentum
        self.groups = [
            {
                "params": list(g["params"]),
                "weight_decay": float(g["weight_decay"]),
                "lr_scale": float(g.get("lr_scale", 1.0)),
            }
            for g in groups
        ]
        for group in self.groups:
            params = group["params"]
            if kind == "sgd":
                group["momentum_buffer"] = [None] * len(params)
            else:
                group["exp_avg"] = [torch.zeros_like(p) for p in params]
                group["exp_avg_sq"] = [torch.zeros_like(p) for p in params]
                group["count"] = [0] * len(params)
        self.steps = 0

    def zero_grad(self):
        for group in self.groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, lr):
        """One update of every parameter that has a gradient, with learning rate ``lr``.

        Parameters without a gradient (unused in this step's loss) are left
        alone, state included, as torch.optim does.
        """
        self.steps += 1
        for group in self.groups:
            used = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            if not used:
                continue
            params = [group["params"][i] for i in used]
            grads = [p.grad for p in params]
            if self.kind == "sgd":
                self._sgd(group, used, params, grads, lr * group["lr_scale"])
            else:
                self._adam(group, used, params, grads, lr * group["lr_scale"])

    def _adam(self, group, used, params, grads, lr):
        beta1, beta2 = self.betas
        decay = group["weight_decay"]
        if decay:
            if self.kind == "adamw":
                torch._foreach_mul_(params, 1.0 - lr * decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=decay)
        exp_avg = [group["exp_avg"][i] for i in used]
        exp_avg_sq = [group["exp_avg_sq"][i] for i in used]
        # Each parameter counts its own updates, for the bias corrections.
        for i in used:
            group["count"][i] += 1
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
        counts = [group["count"][i] for i in used]
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in counts])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, [-lr / (1.0 - beta1**t) for t in counts])

    def _sgd(self, group, used, params, grads, lr):
        decay = group["weight_decay"]
        if decay:
            grads = torch._foreach_add(grads, params, alpha=decay)
        buffers = group["momentum_buffer"]
        fresh = [k for k, i in enumerate(used) if buffers[i] is None]
        for k in fresh:
            buffers[used[k]] = grads[k].clone()
        old = [k for k in range(len(used)) if k not in set(fresh)]
        if old:
            kept = [buffers[used[k]] for k in old]
            torch._foreach_mul_(kept, self.momentum)
            torch._foreach_add_(kept, [grads[k] for k in old])
        # Nesterov: step along the gradient plus the momentum-scaled new buffer.
        update = torch._foreach_add(grads, [buffers[i] for i in used], alpha=self.momentum)
        torch._foreach_add_(params, update, alpha=-lr)
