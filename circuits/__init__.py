"""Weight-only circuit analysis of bilinear MLPs (pure functions over tensors).

u . mlp(x) = x^T Q(u) x with Q(u) = sym(W_gate diag(W_out u) W_in^T); see DESIGN.md section 5.
Model-level wrappers (taking a model and a layer) build on these functions.
"""
from .eigen import Eigen, eigendecompose_from_weights, sort_by_magnitude
from .hosvd import (HOSVD, hosvd_from_weights, interaction_gram, output_gram,
                    singular_interaction_matrix)
from .interaction import (BilinearWeights, as_weights, augment_input, bilinear_mlp_forward,
                          interaction_matrix_from_weights, interaction_matvec)
from .lanczos import batched_lanczos
from .many import default_krylov_steps, topk_eigenvalues_many
from .truncation import check_quadratic_form, effective_rank, truncated_readout

__all__ = [
    "BilinearWeights", "Eigen", "HOSVD", "as_weights", "augment_input", "batched_lanczos",
    "bilinear_mlp_forward", "check_quadratic_form", "default_krylov_steps",
    "eigendecompose_from_weights", "effective_rank", "hosvd_from_weights", "interaction_gram",
    "interaction_matrix_from_weights", "interaction_matvec", "output_gram",
    "singular_interaction_matrix", "sort_by_magnitude", "topk_eigenvalues_many",
    "truncated_readout",
]
