"""Claim 2: without persistent vectors (N = 0, FF removed) the network performs poorly.

The attention-only ablation against the all-attention model and the transformer; it has
2*N*d fewer weights per layer (the claim is about removing them).
"""

from study import FF, JOINT, NO_MEMORY, run_claim

if __name__ == "__main__":
    run_claim("claim2", [NO_MEMORY, JOINT, FF])
