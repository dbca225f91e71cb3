"""How many tokens to propose: the recent acceptance rate against the price of verifying them.

If each proposed token is accepted with probability ``a`` (independently), a verification with k
proposed tokens yields ``(1 - a^(k+1)) / (1 - a)`` tokens (Leviathan et al. 2023, arXiv
2211.17192, eq. 1). Verifying k extra tokens in the same forward pass costs ``1 + beta * k`` times a
plain decoding step: ``beta`` is small while decoding is limited by reading the weights (a laptop,
a small batch), larger when arithmetic starts to count. The best k maximises the ratio; it is 0
(plain decoding) whenever ``a <= beta``, which is what protects open-ended text from paying for
failed guesses.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification of k proposed tokens yields, acceptance ``alpha`` per token."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_length(alpha: float, max_len: int, beta: float) -> int:
    """The k in [0, max_len] with the most tokens per unit of verification cost."""
    best_k, best = 0, 1.0
    for k in range(1, max_len + 1):
        value = expected_tokens(alpha, k) / (1.0 + beta * k)
        if value > best + 1e-12:
            best_k, best = k, value
    return best_k


@dataclass
class AcceptanceEstimate:
    """Exponentially weighted acceptance rate of proposed tokens (each observation weighs ``rate``)."""

    alpha: float = 0.5
    rate: float = 0.1
    observations: int = 0

    def update(self, accepted: int, rejected: int) -> None:
        """``accepted`` successes, then ``rejected`` (0 or 1) failures, in the order they happened."""
        for outcome in [1.0] * accepted + [0.0] * rejected:
            self.alpha += self.rate * (outcome - self.alpha)
        self.observations += accepted + rejected
