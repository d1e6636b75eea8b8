"""The numerical core: pure functions over a symmetric linear operator (``matvec``/``matmat``)."""

from diagnostics.linalg.curvature import (
    CURVATURES,
    EmpiricalFisherOperator,
    FunctionalHessianOperator,
    GaussNewtonOperator,
    SampledFisherCurvature,
)
from diagnostics.linalg.data import DataLoop
from diagnostics.linalg.density import (
    SLQResult,
    gaussian_density,
    negative_mass,
    slq,
    tridiagonal_quadrature,
)
from diagnostics.linalg.lanczos import (
    LanczosResult,
    krylov_quadrature,
    lanczos,
    lanczos_tridiagonal,
)
from diagnostics.linalg.operator import (
    DataOperator,
    DenseOperator,
    HessianOperator,
    LinearOperator,
    preconditioned,
    restricted,
    scaled,
)
from diagnostics.linalg.trace import TraceEstimate, hutchinson, hutchpp

__all__ = [
    "CURVATURES",
    "DataLoop",
    "DataOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "FunctionalHessianOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "LanczosResult",
    "LinearOperator",
    "SLQResult",
    "SampledFisherCurvature",
    "TraceEstimate",
    "gaussian_density",
    "hutchinson",
    "hutchpp",
    "krylov_quadrature",
    "lanczos",
    "lanczos_tridiagonal",
    "negative_mass",
    "preconditioned",
    "restricted",
    "scaled",
    "slq",
    "tridiagonal_quadrature",
]
