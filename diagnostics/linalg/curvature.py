"""Curvature beyond the loss Hessian: Gauss-Newton, Fisher, empirical-Fisher and functional-Hessian operators.

Every operator here is a :class:`~diagnostics.linalg.operator.DataOperator` (the same
:class:`~diagnostics.linalg.data.DataLoop`, micro-batching, sharding and memory check as the Hessian),
so Lanczos, Hutch++, SLQ, ``restricted`` and the rest apply unchanged. For a loss split at the model's
outputs, ``L = (1/N) sum_i l(z_i, y_i)`` with ``z_i = f(w, x_i)`` and ``J_i = dz_i/dw``:

* **GGN** (generalised Gauss-Newton; Schraudolph 2002, Martens 2014): ``G = (1/N) sum_i J_i^T H_l(z_i) J_i``
  with ``H_l`` the Hessian of the loss in the outputs, as ``J^T (H_l (J v))`` (``jvp``/``vjp``, never
  forming ``J``). Closed-form ``H_l`` for the built-in losses (cross-entropy: ``diag(p) - p p^T`` per
  sample; MSE: ``2/numel(z) I``; BCE with logits: ``sigma (1 - sigma) / numel(z)``), autograd for others.
  PSD whenever ``H_l`` is (convex losses).
* **Fisher** of the model's predictive distribution ``p(y | x)``: ``F = (1/N) sum_i E_{y~p(.|x_i)}[g_i(y)
  g_i(y)^T]``. For an exponential family with its canonical link the negative log-likelihood's ``H_l`` does
  not depend on ``y`` and ``F = G`` exactly (Martens 2014, sec. 9.2): cross-entropy on logits (categorical),
  BCE with logits (Bernoulli), and MSE read as the Gaussian ``N(z, sigma^2 I)`` with ``sigma^2 = D/2`` (``D``
  outputs per sample), the noise scale whose negative log-likelihood equals the mean-squared loss up to a
  constant; for another noise scale ``s^2`` the Fisher is ``G * D / (2 s^2)``. Any other loss with integer
  class targets (``nll`` on log-probabilities, custom losses) is read as a normalised negative
  log-likelihood ``p(c | x) = exp(-l(z, c))`` and its Fisher is estimated from ``S`` sampled labels per
  input: ``F_S = (1/N) sum_i J_i^T [(1/S) sum_s r_is r_is^T] J_i`` with ``r_is = grad_z l(z_i, y_is)``,
  ``y_is ~ p(. | x_i)`` drawn once from a seeded generator (the operator is a fixed PSD matrix);
  :func:`sampled_fisher_stderr` gives the Monte-Carlo standard error of its eigenvalues.
* **empirical Fisher**: ``(1/N) sum_i g_i g_i^T`` from the per-sample gradients ``g_i`` of the observed
  labels (``torch.func.vmap`` over one batch's samples at a time; uncentred; Kunstner et al. 2019).
* **functional Hessian** ``H - G = (1/N) sum_i sum_j (dl/dz_ij) d^2 z_ij / dw^2`` (the part of the Hessian
  from the model's own curvature, weighted by the residuals), as the operator difference; the
  outlier/bulk decomposition of Sagun et al. 2017 and Papyan 2019/2020 attributes the Hessian's outliers to
  ``G`` and its bulk largely to this part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diagnostics.batches import Batch, batch_size
from diagnostics.errors import DiagnosticsError
from diagnostics.linalg.data import DataLoop
from diagnostics.linalg.operator import DataOperator, HessianOperator, SumOperator
from diagnostics.linalg.products import (
    GaussNewtonProduct,
    ModelLoss,
    OutputCurvature,
    class_losses,
    empirical_fisher_product,
    label_gradients,
    math_attention,
)

__all__ = [
    "CURVATURES",
    "EmpiricalFisherOperator",
    "FunctionalHessianOperator",
    "GaussNewtonOperator",
    "SampledFisherCurvature",
    "sampled_fisher_stderr",
]

#: the curvature matrices ``diag hessian --curvature`` knows
CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher", "functional")


class GaussNewtonOperator(DataOperator):
    """``v -> J^T M J v`` summed over data: the GGN (``M = H_l``) or the Fisher (``M`` its output-space Fisher).

    Args:
        model_loss: the batch loss split at the model's outputs.
        params: the point ``w``.
        data: a :class:`DataLoop` or the batches (then ``loop_options`` build the loop).
        curvature: the output-space matrix ``M`` per batch (see
            :data:`~diagnostics.linalg.products.OutputCurvature`), e.g. ``output_hessian(loss_name, loss)``.
        kind: ``"ggn"`` or ``"fisher"`` (a label; the matrix is set by ``curvature``).
        backend: ``"auto"``/``"cached"`` (forward mode, falling back to reverse), ``"forward"``, ``"reverse"``.
        compile: ``torch.compile`` the forward-mode product.
        **options: ``max_vectors``, ``autocast``, ``memory_check`` and the loop options of
            :class:`~diagnostics.linalg.operator.DataOperator`.
    """

    def __init__(
        self,
        model_loss: ModelLoss,
        params: Mapping[str, torch.Tensor],
        data: DataLoop | Sequence[Batch],
        *,
        curvature: OutputCurvature,
        kind: str = "ggn",
        backend: str = "auto",
        compile: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(model_loss, params, data, **options)
        if kind not in ("ggn", "fisher"):
            raise ValueError(f"kind must be ggn or fisher, not {kind!r}")
        self.kind = kind
        self.model_loss = model_loss
        self.curvature = curvature
        self.product = GaussNewtonProduct(backend, compile=compile)

    def _batch_product(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        return self.product(self.model_loss, self.params, batch, V, curvature=self.curvature, autocast=self.autocast)


class EmpiricalFisherOperator(DataOperator):
    """``v -> (1/N) sum_i g_i (g_i^T v)`` from per-sample gradients, one batch's ``[n_b, n]`` at a time.

    Args: as for :class:`~diagnostics.linalg.operator.DataOperator` (``batch_loss`` is the mean loss of a
    batch; a sample's loss is that of its one-sample batch). ``micro_batch`` bounds the per-sample
    gradients held at once (``n_micro x n``).
    """

    kind = "empirical_fisher"

    def _batch_product(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        return empirical_fisher_product(self.batch_loss, self.params, batch, V, autocast=self.autocast)

    def memory_required(self, k: int) -> int:
        """The product block's estimate plus the per-sample gradients of the largest (micro-)batch."""
        largest = self.loop.largest()
        rows = 0 if largest is None else batch_size(largest)
        item = torch.empty((), dtype=self.dtype).element_size()
        return super().memory_required(k) + 2 * rows * self.dim * item


class SampledFisherCurvature:
    """The output-space Fisher from sampled labels: ``M_b = (1/n_b) blockdiag_i (1/S) sum_s r_is r_is^T``.

    The model's predictive distribution is read from the loss as a normalised negative log-likelihood over
    ``C`` classes, ``p(c | x_i) = exp(-l(z_i, c))`` (``l`` the loss of a one-sample batch; ``nll`` on
    log-probabilities gives ``p = exp(z)``). For every (micro-)batch of ``loop``, ``S`` labels per sample
    are drawn from it once, with ``generator``, and ``r_is = grad_z l(z_i, y_is)`` is kept
    (``n_b x S x C`` numbers), so the operator is the same fixed matrix at every product.

    Args:
        model_loss: the split loss.
        params: the point ``w``.
        loop: the data loop of the operator this curvature will serve (its batches are the keys).
        samples: ``S``, labels per input (>= 2 for a standard error).
        generator: the labels' random stream.
        autocast: mixed-precision forward.
        normalisation_tol: refuse a loss whose ``sum_c exp(-l(z, c))`` differs from 1 by more than this.

    Raises:
        DiagnosticsError: targets that are not integer labels, outputs that are not ``[N, C]``, or a loss
            that is not a normalised negative log-likelihood over the classes.
    """

    def __init__(
        self,
        model_loss: ModelLoss,
        params: Mapping[str, torch.Tensor],
        loop: DataLoop,
        *,
        samples: int,
        generator: torch.Generator,
        autocast: torch.dtype | None = None,
        normalisation_tol: float = 1e-3,
    ) -> None:
        if samples < 1:
            raise ValueError(f"samples must be positive, got {samples}")
        self.samples = int(samples)
        self.kept: dict[int, tuple[Batch, torch.Tensor]] = {}
        params = {k: v.detach() for k, v in params.items()}
        for batch in loop.batches:
            inputs, targets = batch
            if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dim() != 1:
                raise DiagnosticsError(
                    "--curvature fisher with this loss samples labels from the model's predictive distribution and "
                    "needs integer class targets [N]; for regression use --loss mse (exact Fisher = GGN) or "
                    "--curvature ggn / empirical_fisher"
                )
            with torch.no_grad(), math_attention():
                z = model_loss.outputs(params, inputs, autocast).detach().to(next(iter(params.values())).dtype)
            if z.dim() != 2:
                raise DiagnosticsError(
                    f"--curvature fisher by sampled labels needs [N, C] outputs, got shape {tuple(z.shape)}"
                )
            with torch.no_grad():
                logp = -class_losses(model_loss, z, targets)
            total = logp.exp().sum(dim=1)
            worst = int((total - 1).abs().argmax())
            if not bool(torch.isfinite(total).all()) or abs(float(total[worst]) - 1.0) > normalisation_tol:
                raise DiagnosticsError(
                    f"--curvature fisher: the loss is not a normalised negative log-likelihood over the "
                    f"{z.shape[1]} classes (sum_c exp(-loss(z, c)) = {float(total[worst]):.4g} for a sample, not 1), "
                    "so the model's predictive distribution is unknown; use --curvature ggn or empirical_fisher"
                )
            probs = logp.exp().double().cpu()
            probs = probs / probs.sum(dim=1, keepdim=True)
            labels = torch.multinomial(probs, self.samples, replacement=True, generator=generator)
            r = label_gradients(model_loss, z, labels.to(device=z.device, dtype=targets.dtype))
            self.kept[id(batch)] = (batch, r)

    def gradients(self, batch: Batch) -> torch.Tensor:
        """``r [n_b, S, C]`` of a batch of the loop."""
        kept = self.kept.get(id(batch))
        if kept is None or kept[0] is not batch:
            raise KeyError("this batch is not one of the data loop the sampled Fisher was built for")
        return kept[1]

    def __call__(self, outputs: torch.Tensor, batch: Batch):
        """The output-space Fisher of ``batch`` as a map on ``[k, *outputs.shape]``: the mean over sampled labels of ``r r^T``."""
        r = self.gradients(batch)
        n, s = r.shape[0], r.shape[1]

        def apply(U: torch.Tensor) -> torch.Tensor:
            a = torch.einsum("isc,kic->kis", r.to(U.dtype), U)
            return torch.einsum("kis,isc->kic", a, r.to(U.dtype)) / (n * s)

        return apply


def sampled_fisher_stderr(op: GaussNewtonOperator, vectors: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo standard error of ``u^T F_S u`` for unit eigenvectors ``u`` of a sampled Fisher.

    To first order an eigenvalue of ``F_S`` moves by ``u^T (F_S - F) u`` (``u`` its eigenvector), and
    ``u^T F_S u = (1/N) sum_i (1/S) sum_s a_is^2`` with ``a_is = r_is^T J_i u``: independent draws given the
    inputs. Its variance is ``(1/N^2) sum_i var_s(a_is^2) / S``, with ``var_s`` the sample variance over the
    ``S`` draws (so ``S >= 2``). One data pass of ``J U`` (forward mode).

    Args:
        op: a Fisher operator whose ``curvature`` is a :class:`SampledFisherCurvature`.
        vectors: ``[n, k]`` unit eigenvectors.

    Returns:
        ``[k]`` standard errors (NaN with one draw per input).
    """
    curv = op.curvature
    if not isinstance(curv, SampledFisherCurvature):
        raise ValueError("sampled_fisher_stderr needs a Fisher operator built from sampled labels")
    k = int(vectors.shape[1])
    if curv.samples < 2:
        return torch.full((k,), math.nan, dtype=torch.float64)
    U = vectors.to(dtype=op.dtype, device=op.device)

    def per_batch(batch: Batch) -> torch.Tensor:
        inputs = batch[0]

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return op.model_loss.outputs(p, inputs, op.autocast)

        with math_attention():
            JU = torch.func.vmap(lambda u: torch.func.jvp(f, (dict(op.params),), (op.unflatten(u),))[1], in_dims=1)(U)
        r = curv.gradients(batch).to(JU.dtype)
        a2 = torch.einsum("isc,kic->kis", r, JU) ** 2
        return a2.var(dim=2, unbiased=True).mean(dim=1) / curv.samples

    # N from any (micro-)batch: the loop's weights are n_b / N (global under sharding)
    first = op.loop.batches[0] if op.loop.batches else None
    local = [batch_size(first) / op.loop.weights[0], 1.0] if first is not None else [0.0, 0.0]
    counts = torch.tensor(local, dtype=torch.float64, device=op.device)
    if op.loop.reduce is not None:
        counts = op.loop.reduce(counts)
    total_n = float(counts[0]) / max(float(counts[1]), 1.0)
    mean_var = op.loop.weighted_sum(per_batch, (k,), dtype=op.dtype, device=op.device).double().cpu()
    return (mean_var.clamp(min=0) / total_n).sqrt()


class FunctionalHessianOperator(SumOperator):
    """``H - G``: the Hessian minus the Gauss-Newton matrix over the same data and parameters.

    One product costs one Hessian-vector product and one Gauss-Newton product. The attributes the
    analyzers read from a data operator (``loop``, ``names``, ``group_slices``, ``gradient``, ``notes``,
    ``backend``, ``hvp_count``) come from the Hessian.
    """

    kind = "functional"

    def __init__(self, hessian: HessianOperator, ggn: GaussNewtonOperator) -> None:
        super().__init__([hessian, ggn], [1.0, -1.0])
        self.hessian = hessian
        self.ggn = ggn

    @property
    def loop(self) -> DataLoop:
        """The Hessian's data loop (micro-batches included, once it has cut its batch)."""
        return self.hessian.loop

    @property
    def auto_micro_batch(self) -> int | None:
        """The micro-batch size the Hessian chose itself (None: the batches as given)."""
        return self.hessian.auto_micro_batch

    @property
    def hvp_count(self) -> int:
        """Products of ``H - G`` so far (each one Hessian and one Gauss-Newton product)."""
        return self.matvec_count

    @property
    def backend(self) -> str:
        """The Hessian's product backend (the GGN follows it)."""
        return self.hessian.backend

    @property
    def notes(self) -> list[str]:
        """Notes of both parts, each once."""
        return list(dict.fromkeys(self.hessian.notes + self.ggn.notes))

    @property
    def names(self) -> list[str]:
        """The analysed parameter names."""
        return self.hessian.names

    def group_slices(self) -> dict[str, slice]:
        """``{name: slice}`` of each parameter in the flat vector."""
        return self.hessian.group_slices()

    def flatten(self, tensors: Any) -> torch.Tensor:
        """``{name: tensor}`` (or tensors in layout order) -> ``[n]``."""
        return self.hessian.flatten(tensors)

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[n]`` -> ``{name: tensor}``."""
        return self.hessian.unflatten(v)

    def gradient(self) -> torch.Tensor:
        """The gradient of the mean loss at ``w`` (flat)."""
        return self.hessian.gradient()
