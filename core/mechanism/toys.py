"""Known-answer toys: small models whose in-context algorithm is known by construction.

The mechanism lab's measurements must read these correctly before they are believed
on a language model. The task is von Oswald et al. 2023 ("Transformers learn in-context
by gradient descent", google-research/self-organising-systems, transformers_learn_icl_by_gd):
d = 10, N = 10 examples, x ~ U(-0.5, 0.5)^d, w ~ N(0, I), y = w.x, loss 1/2 (y_hat - y)^2.

- `GDConstruction`: one linear self-attention layer whose weights implement one step
  of gradient descent from w = 0 (their construction); `train_lsa` trains the same
  architecture from random weights, which should land on it (up to scale).
- `softmax_kernel_head`: one softmax head scoring -|x_i - x_q|^2 / tau, a
  Nadaraya-Watson kernel smoother.
- `lookup_toy`: a fixed function of x_q that ignores the in-context y's (recall).

Every toy has `predict(x_train [n, f], y_train [n], x_query [f]) -> float` (numpy in,
float out), the interface `core.mechanism.weights` measures.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

D, N = 10, 10
X_HALF_RANGE = 0.5
# Moments of one coordinate of x ~ U(-a, a): E x^2 = a^2 / 3, E x^4 = a^4 / 5.
X_VAR = X_HALF_RANGE**2 / 3
X_M4 = X_HALF_RANGE**4 / 5


class Toy(Protocol):
    name: str

    def predict(self, x_train: Float[np.ndarray, "n f"], y_train: Float[np.ndarray, " n"],
                x_query: Float[np.ndarray, " f"]) -> float: ...


@dataclass(frozen=True)
class Tasks:
    """A batch of regression tasks: per task n examples and one query."""

    x: Float[Tensor, "b n d"]
    y: Float[Tensor, "b n"]
    x_query: Float[Tensor, "b d"]
    y_query: Float[Tensor, " b"]


def sample_tasks(n_tasks: int, d: int = D, n: int = N, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> Tasks:
    """Returns `n_tasks` tasks of von Oswald et al.: x ~ U(-0.5, 0.5)^d, w ~ N(0, I), y = w.x."""
    x = (torch.rand(n_tasks, n + 1, d, generator=generator, dtype=dtype) - 0.5) * (2 * X_HALF_RANGE)
    w = torch.randn(n_tasks, d, generator=generator, dtype=dtype)
    y = (x @ w[:, :, None])[..., 0]
    return Tasks(x[:, :n], y[:, :n], x[:, n], y[:, n])


def task_loss(pred: Float[Tensor, " b"], y_query: Float[Tensor, " b"]) -> float:
    """Returns von Oswald et al.'s loss, the mean of 1/2 (y_hat - y)^2."""
    return float(0.5 * ((pred - y_query) ** 2).mean())


def gd_one_step(x: Float[Tensor, "b n d"], y: Float[Tensor, "b n"], x_query: Float[Tensor, "b d"],
                eta: float) -> Float[Tensor, " b"]:
    """Returns one gradient step from w = 0 on 1/(2n) sum (w.x_i - y_i)^2, applied to x_q:
    eta/n sum_i y_i x_i.x_q."""
    return eta / x.shape[1] * torch.einsum("bn,bnd,bd->b", y, x, x_query)


def _one_step_moments(d: int, n: int) -> tuple[float, float, float]:
    # s = 1/n sum_i y_i x_i.x_q is the one-step prediction at eta = 1. With w ~ N(0, I)
    # and E x x^T = X_VAR I: E[s y_q] = d X_VAR^2, E[y_q^2] = d X_VAR and
    # E[s^2] = X_VAR / n^2 E tr((X^T X)^2) = X_VAR / n^2 (n E|x|^4 + n (n - 1) d X_VAR^2).
    m4_norm = d * X_M4 + d * (d - 1) * X_VAR**2
    e_s2 = X_VAR / n**2 * (n * m4_norm + n * (n - 1) * d * X_VAR**2)
    return d * X_VAR**2, e_s2, d * X_VAR


def best_eta_exact(d: int = D, n: int = N) -> float:
    """Returns the step eta minimising the expected loss of one GD step on this task (closed form)."""
    e_sy, e_s2, _ = _one_step_moments(d, n)
    return e_sy / e_s2


def one_step_risk(eta: float, d: int = D, n: int = N) -> float:
    """Returns the expected loss 1/2 E (eta s - y_q)^2 of one GD step with step eta (closed form)."""
    e_sy, e_s2, e_y2 = _one_step_moments(d, n)
    return 0.5 * (eta**2 * e_s2 - 2 * eta * e_sy + e_y2)


def best_eta(d: int = D, n: int = N, n_tasks: int = 200_000, seed: int = 0) -> float:
    """Returns the least-squares step over sampled tasks: argmin_eta sum (eta s - y_q)^2."""
    t = sample_tasks(n_tasks, d, n, torch.Generator().manual_seed(seed), torch.float64)
    s = gd_one_step(t.x, t.y, t.x_query, 1.0)
    return float((s @ t.y_query) / (s @ s))


class LinearSelfAttention(nn.Module):
    """One layer of linear self-attention (no softmax) on tokens e_i = (x_i, y_i) and the
    query token e_q = (x_q, 0); keys and values are the n examples, as in von Oswald et
    al. (`include_query=False`). The query's y slot becomes
    e_q[y] + [W_P 1/n sum_i (W_V e_i) (W_K e_i . W_Q e_q)]_y and the prediction is its
    negative (their sign: the slot holds -y_hat)."""

    def __init__(self, d: int = D, init_scale: float = 0.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        shape = (d + 1, d + 1)
        self.w_q, self.w_k, self.w_v, self.w_p = (
            nn.Parameter(torch.randn(shape, generator=generator) * init_scale) for _ in range(4))

    @property
    def name(self) -> str:
        return type(self).__name__

    def forward(self, x: Float[Tensor, "b n d"], y: Float[Tensor, "b n"],
                x_query: Float[Tensor, "b d"]) -> Float[Tensor, " b"]:
        # Only the query's y slot is read, so the layer is u^T (1/n sum_i e_i e_i^T) M e_q
        # with u the y row of W_P W_V and M = W_K^T W_Q: the numbers of attending token by
        # token, at the cost of one (d+1)^2 moment matrix per task.
        e = torch.cat([x, y[..., None]], -1)
        e_q = torch.cat([x_query, torch.zeros_like(x_query[:, :1])], -1)
        return -self.readout(e.transpose(1, 2) @ e / x.shape[1], e_q)

    def readout(self, moments: Float[Tensor, "b k k"], e_q: Float[Tensor, "b k"]) -> Float[Tensor, " b"]:
        """Returns the query's y slot after the layer, given 1/n sum_i e_i e_i^T per task."""
        # Weights follow the input's dtype: numpy float64 calls are exact to float64.
        w_q, w_k, w_v, w_p = (w.to(e_q.dtype) for w in (self.w_q, self.w_k, self.w_v, self.w_p))
        u, m = (w_p @ w_v)[-1], w_k.T @ w_q
        return e_q[:, -1] + ((u @ moments) * (e_q @ m.T)).sum(-1)

    def predict(self, x_train: Float[np.ndarray, "n f"], y_train: Float[np.ndarray, " n"],
                x_query: Float[np.ndarray, " f"]) -> float:
        """Returns the prediction for one prompt, computed in float64."""
        with torch.no_grad():
            t = lambda a: torch.as_tensor(np.asarray(a, np.float64))[None]  # noqa: E731
            return float(self(t(x_train), t(y_train), t(x_query))[0])

    def effective_matrix(self) -> Float[np.ndarray, "d d"]:
        """Returns A in the prediction's term 1/n sum_i y_i x_i^T A x_q: -u_y M_xx, with
        u = the y row of W_P W_V and M = W_K^T W_Q. One GD step has A = eta I."""
        u, m = self._u_m()
        return -u[-1] * m[:-1, :-1]

    def stray_terms(self) -> dict[str, float]:
        """Returns the sizes of the terms one GD step lacks, relative to |A|: u_x (values
        carry x into the y slot) and M_yx (keys read y_i), both 0 in the construction."""
        u, m = self._u_m()
        a = np.linalg.norm(self.effective_matrix())
        return {"u_x": float(np.linalg.norm(u[:-1]) * np.linalg.norm(m[:-1, :-1]) / a),
                "m_yx": float(abs(u[-1]) * np.linalg.norm(m[-1, :-1]) / a)}

    def _u_m(self) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            w = {k: p.double().numpy() for k, p in self.named_parameters()}
        return (w["w_p"] @ w["w_v"])[-1], w["w_k"].T @ w["w_q"]


class GDConstruction(LinearSelfAttention):
    """The linear self-attention weights of von Oswald et al. that implement one GD step
    from w = 0 with step eta: W_K = W_Q = the x block, W_V = -(y -> y), W_P = eta (y -> y)."""

    def __init__(self, d: int = D, eta: float | None = None) -> None:
        super().__init__(d)
        self.double()  # float64 weights: eta exactly, so predictions equal a numpy GD step to float64
        self.eta = best_eta_exact(d) if eta is None else eta
        x_block = torch.diag(torch.cat([torch.ones(d), torch.zeros(1)])).double()
        y_to_y = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        y_to_y[-1, -1] = 1.0
        with torch.no_grad():
            self.w_q.copy_(x_block)
            self.w_k.copy_(x_block)
            self.w_v.copy_(-y_to_y)
            self.w_p.copy_(self.eta * y_to_y)
        self.requires_grad_(False)


@dataclass
class TrainedLSA:
    """A trained `LinearSelfAttention` with its training record."""

    model: LinearSelfAttention
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    eval_loss: float = float("nan")


def train_lsa(seed: int = 0, steps: int = 1000, batch: int = 2048, lr: float = 2e-3, d: int = D, n: int = N,
              init_scale: float = 0.1, eval_tasks: int = 100_000) -> TrainedLSA:
    """Returns a `LinearSelfAttention` trained by Adam on fresh tasks each step (cosine
    learning-rate decay), with its loss on `eval_tasks` held-out tasks (`eval_set(seed)`)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LinearSelfAttention(d, init_scale, gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    threads = torch.get_num_threads()
    # Ops this small run several times faster on one thread, and far faster on a busy machine.
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        for _ in range(steps):
            t = sample_tasks(batch, d, n, gen)
            loss = 0.5 * ((model(t.x, t.y, t.x_query) - t.y_query) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    ev = eval_set(seed, eval_tasks, d, n)
    with torch.no_grad():
        eval_loss = task_loss(model(ev.x, ev.y, ev.x_query), ev.y_query)
    return TrainedLSA(model, losses, seconds, eval_loss)


def eval_set(seed: int = 0, n_tasks: int = 100_000, d: int = D, n: int = N) -> Tasks:
    """Returns held-out tasks, drawn from a stream apart from any training stream of the same seed."""
    return sample_tasks(n_tasks, d, n, torch.Generator().manual_seed(10_000_019 + seed))


def prediction_gradient(model: Callable[[Tensor, Tensor, Tensor], Tensor], tasks: Tasks) -> Float[Tensor, "b d"]:
    """Returns d y_hat / d x_q per task: the local prediction function."""
    xq = tasks.x_query.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(tasks.x, tasks.y, xq).sum(), xq)
    return grad


class SoftmaxKernelHead:
    """One softmax attention head over the examples with scores -|x_i - x_q|^2 / tau, values
    y_i: a Nadaraya-Watson smoother with a Gaussian kernel of bandwidth sqrt(tau / 2).
    As attention, the score is the bilinear 2 x_i.x_q / tau plus a key bias -|x_i|^2 / tau;
    the -|x_q|^2 / tau term is the same for every key and cancels in the softmax."""

    name = "softmax-kernel-head"

    def __init__(self, tau: float = 0.2) -> None:
        self.tau = tau

    def __call__(self, x: Float[Tensor, "b n d"], y: Float[Tensor, "b n"],
                 x_query: Float[Tensor, "b d"]) -> Float[Tensor, " b"]:
        scores = -((x - x_query[:, None]) ** 2).sum(-1) / self.tau
        return (scores.softmax(-1) * y).sum(-1)

    def predict(self, x_train: Float[np.ndarray, "n f"], y_train: Float[np.ndarray, " n"],
                x_query: Float[np.ndarray, " f"]) -> float:
        """Returns the attention-weighted mean of the y's."""
        scores = -((np.asarray(x_train) - x_query) ** 2).sum(-1) / self.tau
        a = np.exp(scores - scores.max())
        return float(a @ y_train / a.sum())


def softmax_kernel_head(tau: float = 0.2) -> SoftmaxKernelHead:
    """Returns the softmax kernel head with temperature tau."""
    return SoftmaxKernelHead(tau)


def sum_of_sines(x_query: Float[np.ndarray, " f"]) -> float:
    return float(np.sin(2 * np.asarray(x_query)).sum())


@dataclass(frozen=True)
class LookupToy:
    """Predicts a fixed ("recalled") function of x_q and ignores the in-context examples."""

    fn: Callable[[np.ndarray], float] = sum_of_sines
    name: str = "lookup"

    def predict(self, x_train: Float[np.ndarray, "n f"], y_train: Float[np.ndarray, " n"],
                x_query: Float[np.ndarray, " f"]) -> float:
        """Returns fn(x_q)."""
        return float(self.fn(x_query))


def lookup_toy(fn: Callable[[np.ndarray], float] = sum_of_sines) -> LookupToy:
    """Returns the lookup toy recalling `fn` (default: sum_j sin(2 x_q,j))."""
    return LookupToy(fn)
