"""What a request costs: the estimate reserved before the call, and the actual cost from `usage`.

Money is integer nano-USD (1e-9 USD) so that sums never drift through float rounding: a
price of $32 per 1M tokens is exactly 32,000 nano-USD per token.
"""

from __future__ import annotations

from dataclasses import dataclass

NANO_PER_USD = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Cost:
    """Images, tokens per price bucket, and USD, for one request (estimated or actual)."""

    images: int = 0
    text_in_tokens: int = 0
    image_in_tokens: int = 0
    image_out_tokens: int = 0  # every output token, priced as image output
    nano_usd: int = 0

    @property
    def tokens(self) -> int:
        return self.text_in_tokens + self.image_in_tokens + self.image_out_tokens

    @property
    def usd(self) -> float:
        return self.nano_usd / NANO_PER_USD
