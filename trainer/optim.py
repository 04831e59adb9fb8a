"""StableAdamW and the warm-up + cosine schedule (method.md section 4).

StableAdamW is AdamW (decoupled weight decay, here with AMSGrad) whose step size is divided by
max(1, RMS(g^2 / v_hat)^(1/2)) per tensor: when a gradient is far larger than the running second
moment suggests, the update is clipped instead of exploding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class StableAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        eps: float = 1e-10,
        amsgrad: bool = True,
        clip_threshold: float = 1.0,
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps,
            "amsgrad": amsgrad, "clip_threshold": clip_threshold,
        }
        super().__init__(params, defaults)

    @staticmethod
    def update_rms(grad: torch.Tensor, v_hat: torch.Tensor, eps: float) -> torch.Tensor:
        """RMS of grad / sqrt(v_hat): 1 when the gradient matches its running scale.

        Kept as a tensor: calling .item() per parameter would synchronise the GPU every step.
        """
        return torch.sqrt(torch.mean(grad.pow(2) / torch.clamp(v_hat, min=eps * eps)))

    @torch.no_grad()
    # Narrower than torch's step(closure): the training loop never passes a closure.
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # noqa: ARG002
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if not state:
                    # The step count stays on the CPU so reading it never waits for the GPU.
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                step = int(state["step"].item())
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                second = state["exp_avg_sq"]
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                bias1 = 1 - beta1**step
                v_hat = second / (1 - beta2**step)
                rms = self.update_rms(grad, v_hat, group["eps"])
                lr = group["lr"] / torch.clamp(rms / group["clip_threshold"], min=1.0)
                param.mul_(1 - lr * group["weight_decay"])
                param.sub_(state["exp_avg"] / (v_hat.sqrt() + group["eps"]) * (lr / bias1))


def learning_rate(iteration: int, total: int, base: float, final: float, warmup: int) -> float:
    """Linear warm-up 0 -> base over ``warmup`` iterations, then cosine to exactly ``final`` at the last."""
    if iteration < warmup:
        return base * iteration / warmup
    span = max(total - 1 - warmup, 1)
    progress = min((iteration - warmup) / span, 1.0)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))
