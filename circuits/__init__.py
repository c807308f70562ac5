"""circuits: weight-only circuit finding for bilinear MLPs.

An MLP `mlp(x) = ((x W_gate) * (x W_in)) W_out` read along an output direction u is the quadratic
form `u . mlp(x) = x^T Q(u) x`, `Q(u) = sym(W_gate diag(W_out u) W_in^T)`; the eigenvectors of Q(u)
are the input features that build that output (DESIGN.md section 5).

Model level (take a HookedBilinearTransformer and a layer; norms folded in; nothing modified):
    interaction_matrix, eigendecompose, hosvd, mlp_weights, check_exactness
    directions: unembed_direction, logit_diff_direction, head_directions, mlp_feature_directions, user_direction
    readouts:   direct_token_scores, ov_token_scores, top_tokens, direct_token_table
    truncation: truncated_mlps, truncation_sweep
    circuits:   find_circuit -> CircuitGraph (table, JSON, PNG/HTML)
Tensor level (pure functions of the weight matrices):
    interaction_matrix_from_weights, interaction_matvec, eigendecompose_from_weights,
    topk_eigenvalues_many, hosvd_from_weights, check_quadratic_form, effective_rank, ...
"""

from .directions import head_directions, logit_diff_direction, mlp_feature_directions, unembed_direction, user_direction
from .eigen import Eigen, eigendecompose_from_weights, sort_by_magnitude
from .find import feature_tokens, find_circuit, target_direction
from .graph import CircuitEdge, CircuitGraph, CircuitNode
from .hosvd import HOSVD, hosvd_from_weights, interaction_gram, output_gram, singular_interaction_matrix
from .interaction import (BilinearWeights, as_weights, augment_input, bilinear_mlp_forward,
                          interaction_matrix_from_weights, interaction_matvec)
from .lanczos import batched_lanczos
from .layer import (ExactnessReport, MLPWeights, check_exactness, eigendecompose, hosvd, interaction_matrix,
                    mlp_input, mlp_weights)
from .many import default_krylov_steps, topk_eigenvalues_many
from .readout import TopTokens, direct_token_scores, direct_token_table, normalized_embeddings, ov_token_scores, top_tokens
from .truncated_model import TruncationResult, truncated_mlps, truncation_sweep
from .truncation import check_quadratic_form, effective_rank, truncated_readout
from .paths import TopPairs, pair_terms, top_pair_entries
from .mlp_paths import PathPair, PathTerms, TokenPath, mlp_path_terms, ov_matrices, rank_path_pairs, token_paths
from .attention import QKPreferences, composition_score, offset_attention, qk_preferences, qk_scores
from .token_view import TokenView, token_view
from .evidence import PairEvidence, TokenEvidence, key_attention, token_evidence
from .layer import eigen_readout_correlation
from .readout import live_token_ids, live_token_mask
from .sae import (InputBasis, OutputFeatures, SAEWeights, input_basis, load_sae, load_scope_sae, output_features,
                  scope_hook_name)
from .sae_features import (EigenCorrelation, InputInteractions, SAEExactness, TopInteractions, check_input_features,
                           check_output_features, eigen_correlation, feature_interactions, sae_activations,
                           top_activating_tokens, top_interactions, top_interactions_on_corpus, typical_activations)
from .sae_report import sae_report_section
from .sae_training import train_sae

__all__ = [
    # model level
    "interaction_matrix", "eigendecompose", "hosvd", "mlp_weights", "mlp_input", "check_exactness",
    "MLPWeights", "ExactnessReport",
    "unembed_direction", "logit_diff_direction", "head_directions", "mlp_feature_directions", "user_direction",
    "direct_token_scores", "ov_token_scores", "normalized_embeddings", "top_tokens", "TopTokens", "direct_token_table",
    "truncated_mlps", "truncation_sweep", "TruncationResult",
    "find_circuit", "target_direction", "feature_tokens", "CircuitGraph", "CircuitNode", "CircuitEdge",
    "live_token_ids", "live_token_mask", "eigen_readout_correlation",
    "token_paths", "TokenPath", "rank_path_pairs", "PathPair", "mlp_path_terms", "PathTerms", "ov_matrices",
    "qk_scores", "qk_preferences", "QKPreferences", "offset_attention", "composition_score",
    "token_view", "TokenView", "token_evidence", "TokenEvidence", "PairEvidence", "key_attention",
    "pair_terms", "top_pair_entries", "TopPairs",
    # SAE features
    "SAEWeights", "OutputFeatures", "InputBasis", "load_sae", "load_scope_sae", "scope_hook_name", "output_features",
    "input_basis", "SAEExactness", "InputInteractions", "TopInteractions", "EigenCorrelation", "sae_activations",
    "check_output_features", "check_input_features", "feature_interactions", "top_interactions",
    "top_interactions_on_corpus", "eigen_correlation", "typical_activations", "top_activating_tokens",
    "sae_report_section", "train_sae",
    # tensor level
    "BilinearWeights", "Eigen", "HOSVD", "as_weights", "augment_input", "batched_lanczos",
    "bilinear_mlp_forward", "check_quadratic_form", "default_krylov_steps",
    "eigendecompose_from_weights", "effective_rank", "hosvd_from_weights", "interaction_gram",
    "interaction_matrix_from_weights", "interaction_matvec", "output_gram",
    "singular_interaction_matrix", "sort_by_magnitude", "topk_eigenvalues_many", "truncated_readout",
]
