"""circuits: weight-only circuit finding for bilinear MLPs.

An MLP `mlp(x) = ((x W_gate) * (x W_in)) W_out` read along an output direction u is the quadratic
form `u . mlp(x) = x^T Q(u) x`, `Q(u) = sym(W_gate diag(W_out u) W_in^T)`; the eigenvectors of Q(u)
are the input features that build that output (DESIGN.md section 5).

Modules, in the order a reader can follow (each imports only modules above it):

1. Tensor-level mathematics (weights in, tensors out; no model):
   interaction.py   Q(u), matrix-free products, the bias augmentation
   lanczos.py       the Lanczos solvers eigen.py uses for large d
   eigen.py         eigenpairs of one Q or of many (a whole vocabulary), truncation, effective rank
   hosvd.py         output directions sharing input features (higher-order SVD via a Gram matrix)
   paths.py         the readout as a sum of path-pair terms; top entries of token-pair tables
   competitors.py   typical competitors for attention, drawn independently (the draw expectations)
2. Model-level views (a HookedBilinearTransformer and a layer; nothing modified):
   mlp.py           one MLP as plain matrices (norm folded), exactness check, activation metric
   directions.py    output directions: unembedding, logit differences, head read-ins, later MLPs
   readout.py       live tokens, reading features back into tokens
   pair_chain.py    the model after two tokens: where a token sits before a query
   token_view.py    the model reading one token at a time (effective embeddings)
   attention.py     the QK side: where heads look; composition scores
   mlp_paths.py     the paths feeding an MLP: exact data view, weight-view token-pair tables
   truncation.py    truncated MLPs in the model, the truncation sweep
   sae.py, sae_features.py, sae_report.py, sae_training.py   SAE features as MLP inputs and outputs
3. Circuit finding:
   virtual_context.py  the query position run through every layer with a few key tokens, one
                    placement at a time (a token's mean effect, a pair's exact interaction)
   context_view.py  every token's residual with typical text before it (context embeddings)
   evidence.py      which context tokens push a logit target, through which heads and MLPs
   graph.py, find.py   the circuit DAG and the backward walk that builds it
4. report.py        `hooked-bilinear circuits`: the markdown report
"""

from .directions import head_directions, logit_diff_direction, mlp_feature_directions, unembed_direction, user_direction
from .eigen import (Eigen, check_quadratic_form, default_krylov_steps, eigendecompose_from_weights, effective_rank,
                    sort_by_magnitude, topk_eigenvalues_many, truncated_readout)
from .find import feature_tokens, find_circuit, target_direction
from .graph import CircuitEdge, CircuitGraph, CircuitNode
from .hosvd import HOSVD, hosvd_from_weights, interaction_gram, output_gram, singular_interaction_matrix
from .interaction import (BilinearWeights, as_weights, augment_input, bilinear_mlp_forward,
                          interaction_matrix_from_weights, interaction_matvec)
from .lanczos import batched_lanczos
from .mlp import (ExactnessReport, MLPWeights, check_exactness, eigendecompose, hosvd, interaction_matrix,
                    mlp_input, mlp_weights)
from .readout import TopTokens, direct_token_scores, direct_token_table, normalized_embeddings, ov_token_scores, top_tokens
from .truncation import TruncationResult, truncated_mlps, truncation_sweep
from .paths import TopPairs, pair_terms, top_pair_entries
from .mlp_paths import PathPair, PathTerms, TokenPath, mlp_path_terms, rank_path_pairs, token_paths
from .attention import QKPreferences, composition_score, offset_attention, ov_matrices, qk_preferences, qk_scores
from .pair_chain import PairChain, pair_chain
from .token_view import TokenView, token_view
from .virtual_context import expected_interaction, expected_readout, virtual_readout
from .context_view import context_view
from .evidence import PairEvidence, TokenEvidence, key_attention, token_evidence
from .mlp import eigen_readout_correlation
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
    "token_view", "TokenView", "context_view", "virtual_readout", "token_evidence", "TokenEvidence", "PairEvidence", "key_attention",
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
