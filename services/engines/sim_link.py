"""A simulated KV link: `latency_s + tokens × bytes_per_token / bandwidth`.

One model for every KV move the sim engine makes — a P/D pull from a prefill worker
(sim_model.KVTransfer) and a load from the KV store (sim_store.StoreLink); they differ only
in their default bandwidth.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KVLink:
    """Defaults: 128 KiB of KV per token (Llama-3-8B in bf16: 32 layers × 8 KV heads × 128 dims
    × K and V × 2 bytes); the fixed latency stands for a transfer's handshake and completion."""

    bytes_per_token: int = 128 * 1024
    bandwidth_gbps: float = 400.0  # gigabits per second, NIC convention
    latency_s: float = 0.001

    def __post_init__(self) -> None:
        if self.bytes_per_token < 0 or self.bandwidth_gbps <= 0 or self.latency_s < 0:
            raise ValueError("bytes_per_token and latency_s must be >= 0 and bandwidth_gbps > 0")

    def wire_time(self, tokens: int) -> float:
        """Seconds the link is busy moving `tokens` tokens of KV (no fixed latency)."""
        return tokens * self.bytes_per_token * 8 / (self.bandwidth_gbps * 1e9)

    @property
    def tokens_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8 / max(1, self.bytes_per_token)
