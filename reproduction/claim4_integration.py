"""Claim 4 (Fig. 2, right): a joint softmax over context and persistent vectors beats the other
ways of integrating them (DESIGN §2.9): attn-split, head-split (half the persistent vectors,
fewer parameters), single-head, and FF-attn (the transformer with a softmax FF of d_inner = N,
at the same depth: equal weights up to the FF's output bias and second LayerNorm)."""

from study import ATTN_SPLIT, FF_ATTN, HEAD_SPLIT, JOINT, SINGLE_HEAD, run_claim

if __name__ == "__main__":
    run_claim("claim4", [JOINT, ATTN_SPLIT, HEAD_SPLIT, SINGLE_HEAD, FF_ATTN])
