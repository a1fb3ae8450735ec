"""Claim 1: at (nearly) equal parameters the all-attention network matches the transformer.

The all-attention model (N = 128) against its FF twin (d_inner = 128, ReLU): the same
2*N*d persistent/FF weights per layer; the FF adds its biases and a second LayerNorm.
"""

from study import FF, JOINT, run_claim

if __name__ == "__main__":
    run_claim("claim1", [JOINT, FF])
