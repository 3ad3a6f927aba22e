"""A scaling law fitted to your own runs: the final loss as a function of parameters N and training tokens D,

    L(N, D) = E + A / N^alpha + B / D^beta                                      (Hoffmann et al. 2022, eq. 2)

fitted as Hoffmann et al.'s approach 3 does (and Besiroglu et al. 2024's replication): the Huber loss (delta 1e-3)
between log L(N, D) and the log of each run's loss, over log-parameters (a = log A, b = log B, e = log E, alpha,
beta), from a grid of starting points (Adam steps from all of them at once, then L-BFGS from the best), the best fit
kept. Bootstrap refits on runs drawn with replacement
give each constant's uncertainty.

Under the budget C = 6ND (FLOPs), the loss is lowest at (Hoffmann et al. 2022, appendix D.2)

    N_opt(C) = G (C/6)^(beta/(alpha+beta)),  D_opt(C) = (C/6) / N_opt(C),  G = (alpha A / (beta B))^(1/(alpha+beta))

so the compute-optimal tokens per parameter D_opt/N_opt depends on C unless alpha = beta. N is every parameter of
the model, embeddings included, as Hoffmann et al. counted theirs (Pearce & Song 2024, "Reconciling Kaplan and
Chinchilla Scaling Laws": the convention moves the optimum).
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

HUBER_DELTA = 1e-3
GRID = {  # starting points (Hoffmann et al.'s grid, coarser): a, b, e (logs), alpha, beta
    "a": (0.0, 5.0, 10.0, 15.0),
    "b": (0.0, 5.0, 10.0, 15.0),
    "e": (-1.0, 0.0, 1.0),
    "alpha": (0.0, 0.5, 1.0),
    "beta": (0.0, 0.5, 1.0),
}


@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        """Predicted loss for n parameters trained on d tokens (floats or numpy arrays)."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) for a budget of `flops` = 6ND."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return n, flops / 6 / n


def _objective(params: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_loss: torch.Tensor):
    """The Huber loss of each row of params (S, 5): a, b, e, alpha, beta; (S,)."""
    a, b, e, alpha, beta = params.unbind(-1)
    terms = [a[:, None] - alpha[:, None] * log_n, b[:, None] - beta[:, None] * log_d, e[:, None].expand(-1, len(log_n))]
    predicted = torch.logsumexp(torch.stack(terms), dim=0)  # (S, runs)
    huber = torch.nn.functional.huber_loss(
        predicted, log_loss.expand_as(predicted), delta=HUBER_DELTA, reduction="none"
    )
    return huber.sum(-1)


def fit(n, d, loss, starts=None, descend: int = 1000) -> Law:
    """The law that best fits losses `loss` of runs with n parameters and d tokens (sequences of equal length),
    from each of `starts` (a, b, e, alpha, beta) tuples (default: GRID's): all starts descend at once, `descend`
    steps of Adam (whose steps are elementwise, so each start moves on its own), then L-BFGS polishes the best few."""
    log_n, log_d, log_loss = (torch.tensor(np.log(np.asarray(x, dtype=np.float64))) for x in (n, d, loss))
    params = torch.tensor(list(starts or itertools.product(*GRID.values())), dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([params], lr=0.05)
    for _ in range(descend):
        adam.zero_grad()
        _objective(params, log_n, log_d, log_loss).sum().backward()
        adam.step()
    with torch.no_grad():
        values = _objective(params, log_n, log_d, log_loss).nan_to_num(math.inf)
    best, best_value = None, math.inf
    for i in values.argsort()[:8].tolist():
        polished = params[i : i + 1].detach().clone().requires_grad_()
        lbfgs = torch.optim.LBFGS([polished], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure(lbfgs=lbfgs, polished=polished):
            lbfgs.zero_grad()
            value = _objective(polished, log_n, log_d, log_loss).sum()
            value.backward()
            return value

        lbfgs.step(closure)
        with torch.no_grad():
            value = _objective(polished, log_n, log_d, log_loss).item()
        a, b, e, alpha, beta = polished[0].tolist()
        plausible = 0 < alpha <= 10 and 0 < beta <= 10 and all(-700 < x < 700 for x in (a, b, e))  # not degenerate
        if math.isfinite(value) and value < best_value and plausible:
            best, best_value = (a, b, e, alpha, beta), value
    if best is None:
        raise ValueError("no fit converged")
    a, b, e, alpha, beta = best
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def bootstrap(law: Law, n, d, loss, samples: int = 100, seed: int = 0) -> list[Law]:
    """Fits on `samples` resamples of the runs (drawn with replacement), each started from `law` (the fit on all of
    them); resamples that do not converge are left out."""
    start = [(math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta)]
    rng = np.random.default_rng(seed)
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    laws = []
    for _ in range(samples):
        pick = rng.integers(0, len(n), len(n))
        if len(set(pick.tolist())) < 5:  # five unknowns
            continue
        try:
            laws.append(fit(n[pick], d[pick], loss[pick], start, descend=0))
        except ValueError:
            continue
    return laws
