"""Claim 3 (Fig. 2, left): more persistent vectors help. N in {0, 32, 128, 512}, all else
equal (the parameters grow by 2*N*d per layer)."""

from study import N_SWEEP, run_claim

if __name__ == "__main__":
    run_claim("claim3", [N_SWEEP[n] for n in sorted(N_SWEEP)])
