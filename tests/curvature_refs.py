"""Dense float64 references for curvature matrices, built without the code under test (importable as
``curvature_refs``: pytest puts tests/ on sys.path).

``J`` by ``torch.func.jacrev``; output Hessians and Hessians by ``torch.autograd.functional.hessian`` (not
``torch.func.hessian``, which can be wrong for layer_norm in torch 2.13); per-sample gradients by a loop of
``torch.autograd.grad``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, jacrev


def flat_params(ctx):
    names = list(ctx.params)
    return names, torch.cat([ctx.params[n].reshape(-1) for n in names])


def unflat(ctx, names, w):
    out, i = {}, 0
    for n in names:
        t = ctx.params[n]
        out[n] = w[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def model_fn(ctx, X):
    """``w -> z`` of the inputs ``X`` with the context's frozen tensors."""
    names, _ = flat_params(ctx)
    return lambda v: functional_call(ctx.model, {**ctx.frozen, **unflat(ctx, names, v)}, (X,))


def dense_jacobian(ctx, X):
    """``J [numel(z), n]`` by jacrev."""
    _, w = flat_params(ctx)
    return jacrev(model_fn(ctx, X))(w).reshape(-1, w.numel())


def dense_output_hessian(loss, z, y):
    """``H_l [numel(z), numel(z)]`` of ``loss(z, y)``."""
    return torch.autograd.functional.hessian(lambda q: loss(q.reshape(z.shape), y), z.detach().reshape(-1))


def batch_weights(batches):
    N = sum(len(b[1]) for b in batches)
    return [len(b[1]) / N for b in batches]


def dense_ggn(ctx, batches):
    """``sum_b (n_b/N) J_b^T H_l,b J_b``."""
    _, w = flat_params(ctx)
    total = torch.zeros(w.numel(), w.numel(), dtype=w.dtype)
    for (X, y), wb in zip(batches, batch_weights(batches)):
        J = dense_jacobian(ctx, X)
        z = model_fn(ctx, X)(w)
        total += wb * J.T @ dense_output_hessian(ctx.loss_fn, z, y) @ J
    return total


def dense_loss_hessian(ctx, batches):
    """The Hessian of ``sum_b (n_b/N) L_b``."""
    _names, w = flat_params(ctx)

    def L(v):
        return sum(wb * ctx.loss_fn(model_fn(ctx, X)(v), y) for (X, y), wb in zip(batches, batch_weights(batches)))

    return torch.autograd.functional.hessian(L, w)


def dense_gradient(ctx, batches):
    _, w = flat_params(ctx)
    leaf = w.clone().requires_grad_(True)
    L = sum(wb * ctx.loss_fn(model_fn(ctx, X)(leaf), y) for (X, y), wb in zip(batches, batch_weights(batches)))
    (g,) = torch.autograd.grad(L, leaf)
    return g


def dense_per_sample_grads(ctx, batches):
    rows = []
    for X, y in batches:
        for i in range(len(y)):
            leaves = {n: t.clone().requires_grad_(True) for n, t in ctx.params.items()}
            out = functional_call(ctx.model, {**ctx.frozen, **leaves}, (X[i : i + 1],))
            g = torch.autograd.grad(ctx.loss_fn(out, y[i : i + 1]), list(leaves.values()))
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def dense_empirical_fisher(ctx, batches):
    G = dense_per_sample_grads(ctx, batches)
    return G.T @ G / G.shape[0]


def eig_desc(M):
    return np.sort(np.linalg.eigvalsh(M.numpy()))[::-1]


# ------------------------------------------------------------------------------------- factories
import tinymodels as tm  # noqa: E402


class LogSoftmaxTiny(tm.Tiny):
    """The tiny classifier returning log-probabilities (for ``--loss nll``)."""

    def forward(self, x):
        return torch.log_softmax(super().forward(x), dim=1)


def build_logsoftmax() -> LogSoftmaxTiny:
    torch.manual_seed(0)
    return LogSoftmaxTiny()


class DictTiny(tm.Tiny):
    """The tiny classifier returning ``{"logits": z, "hidden": h}``, as transformers-style models do."""

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return {"hidden": h, "logits": self.fc2(h)}


def build_dict_tiny() -> DictTiny:
    torch.manual_seed(0)
    return DictTiny()
