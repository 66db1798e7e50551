"""Temperature schedules: the value of VarCon's ``tau1`` and ``eps`` at each epoch. No Ray, no MLflow.

For epochs e = 1..E and progress p = (e - 1) / (E - 1), a schedule moves both values from their start
(``loss.tau1``, ``loss.eps``) to their end (``loss.schedule.tau1_end``, ``loss.schedule.eps_end``):

    constant   v(e) = start
    linear     v(e) = start + (end - start) p
    cosine     v(e) = end + (start - end) (1 + cos(pi p)) / 2
    step       v(e) = start + (end - start) k / (n - 1),   k = floor((e - 1) n / E), n = ``steps`` phases
    piecewise  v(e) = values[j] for the last j with epochs[j] <= e   (a replayed, e.g. PBT-discovered, schedule)

tau1 and eps share p (or k), so ``eps < tau1`` at both ends (or at every piecewise point) implies it at every
epoch: tau1(e) - eps(e) is the same interpolation of the two end gaps.

    periodic   tau1(e) = h + (tau1 - h) (1 + cos(2 pi (e - 1) / T)) / 2,   h = ``tau1_half_period``, T = ``period``

Kukleva et al. (ICLR 2023, "Temperature schedules for self-supervised contrastive methods on long-tail data"):
tau1 starts at ``loss.tau1``, reaches h at every half period and is back every T epochs. eps follows
``eps_rule``: ``ratio`` eps(e) = loss.eps tau1(e) / loss.tau1 (the paper's 0.02 / 0.1 kept at every epoch), or
``fixed`` eps(e) = loss.eps. Under either rule tau1 - eps is smallest where tau1 is, so the bounds are checked at
the lower bound: eps < tau1 and tau1 - eps >= ``MIN_GAP`` (tau2 >= tau1 - eps stays a usable temperature).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import LossConfig

KINDS = ("constant", "linear", "cosine", "step", "piecewise", "periodic")
EPS_RULES = ("ratio", "fixed")
MIN_GAP = 0.02  # periodic: the least tau1 - eps (the lowest temperature tau2 can take)


@dataclass(frozen=True)
class Temperatures:
    tau1: float
    eps: float


def _interpolate(kind: str, start: float, end: float, epoch: int, epochs: int, steps: int) -> float:
    progress = (epoch - 1) / max(1, epochs - 1)
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "step":
        phase = min(steps - 1, (epoch - 1) * steps // epochs)
        return start + (end - start) * phase / (steps - 1)
    return start


def temperatures_at(loss_config: LossConfig, epoch: int, epochs: int) -> Temperatures:
    """``tau1`` and ``eps`` for ``epoch`` (1-based) of ``epochs`` under ``loss_config.schedule``."""
    s = loss_config.schedule
    if s.kind == "piecewise":
        index = max(j for j, start in enumerate(s.epochs) if start <= epoch)
        return Temperatures(s.tau1_values[index], s.eps_values[index])
    if s.kind == "periodic":
        half = s.tau1_half_period
        tau1 = half + (loss_config.tau1 - half) * 0.5 * (1.0 + math.cos(2.0 * math.pi * (epoch - 1) / s.period))
        eps = loss_config.eps * tau1 / loss_config.tau1 if s.eps_rule == "ratio" else loss_config.eps
        return Temperatures(tau1, eps)
    tau1_end = loss_config.tau1 if s.tau1_end is None else s.tau1_end
    eps_end = loss_config.eps if s.eps_end is None else s.eps_end
    return Temperatures(_interpolate(s.kind, loss_config.tau1, tau1_end, epoch, epochs, s.steps),
                        _interpolate(s.kind, loss_config.eps, eps_end, epoch, epochs, s.steps))


def schedule_problem(loss_config: LossConfig, epochs: int) -> str | None:
    """Why ``loss_config.schedule`` cannot run for ``epochs`` epochs (a message naming the fix), or ``None``."""
    s = loss_config.schedule
    if s.kind not in KINDS:
        return f"loss.schedule.kind={s.kind!r} is unknown: use one of {', '.join(KINDS)}"
    if s.kind != "constant" and loss_config.name != "varcon":
        return f"loss.schedule.kind={s.kind} schedules VarCon's tau1 and eps: use loss.name=varcon or kind=constant"
    if s.kind == "step" and s.steps < 2:
        return f"loss.schedule.steps={s.steps} must be >= 2 for a step schedule"
    if s.kind == "periodic":
        return _periodic_problem(loss_config)
    if s.kind == "piecewise":
        if not (len(s.epochs) == len(s.tau1_values) == len(s.eps_values) >= 1):
            return "loss.schedule.epochs, tau1_values and eps_values must be lists of one equal, non-zero length"
        if s.epochs[0] != 1 or any(b <= a for a, b in zip(s.epochs, s.epochs[1:])):
            return f"loss.schedule.epochs={s.epochs} must start at 1 and increase"
        points = zip(s.tau1_values, s.eps_values)
    else:
        tau1_end = loss_config.tau1 if s.tau1_end is None else s.tau1_end
        eps_end = loss_config.eps if s.eps_end is None else s.eps_end
        points = [(loss_config.tau1, loss_config.eps), (tau1_end, eps_end)]
    for tau1, eps in points:
        if not (tau1 > 0 and 0 <= eps < tau1):
            return (f"the temperature schedule reaches tau1={tau1}, eps={eps}: every tau1 must be > 0 and every "
                    f"eps in [0, tau1); change loss.schedule")
    return None


def _periodic_problem(loss_config: LossConfig) -> str | None:
    s = loss_config.schedule
    if s.period < 2:
        return f"loss.schedule.period={s.period} must be >= 2 epochs for a periodic schedule"
    if s.tau1_half_period is None:
        return "loss.schedule.tau1_half_period must be set for a periodic schedule (the other bound of tau1)"
    if s.eps_rule not in EPS_RULES:
        return f"loss.schedule.eps_rule={s.eps_rule!r} is unknown: use one of {', '.join(EPS_RULES)}"
    low = min(loss_config.tau1, s.tau1_half_period)
    eps = loss_config.eps * low / loss_config.tau1 if s.eps_rule == "ratio" else loss_config.eps
    if not (loss_config.eps >= 0 and low - eps >= MIN_GAP):
        return (f"the periodic schedule reaches tau1={low:g} with eps={eps:g} (eps_rule={s.eps_rule}): tau1 - eps must "
                f"stay >= {MIN_GAP} and eps >= 0; raise the lower bound of tau1 or lower loss.eps")
    return None
