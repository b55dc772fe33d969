"""Privacy accounting for DP runs with Flower's ``RdpAccountant`` (which wraps Google's ``dp-accounting``).

Each round that releases something private composes one :class:`flwr.serverapp.GaussianPrivacyEvent`
whose noise multiplier is the round's effective one
(:func:`florg.core.privacy.accounting_noise_multiplier`); the cumulative epsilon at
``privacy.delta`` goes into that round's metrics row as ``privacy_epsilon`` (with
``privacy_delta`` and ``privacy_releases``). See ``docs/privacy.md`` for what the numbers mean.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig

from florg.config import RunConfig
from florg.core.privacy import accounting_noise_multiplier, check_accounting_available

__all__ = ["PrivacyLedger"]


class PrivacyLedger:
    """The run's cumulative (epsilon, delta), one composed Gaussian event per private round.

    * ``local``: a client's uploads in the rounds it takes part in; reported for a client that
      takes part in every round. No amplification (the server sees who sends).
    * ``central``: the released global model, per round; add/remove-one-client neighbours and
      no amplification, or (``privacy.amplification``) sampling without replacement of ``m`` of
      ``N`` clients with replace-one neighbours.
    """

    def __init__(self, cfg: RunConfig) -> None:
        pv = cfg.privacy
        if pv.mode not in ("local", "central"):
            raise ValueError(f"PrivacyLedger needs privacy.mode local or central, got {pv.mode!r}")
        check_accounting_available()
        self.mode = pv.mode
        self.delta = float(pv.delta)
        self.reproducible = bool(pv.reproducible_noise)
        self.population = int(cfg.data.num_clients)
        amplified = pv.mode == "central" and pv.amplification
        self.noise_multiplier = accounting_noise_multiplier(
            pv.mode, pv.noise_multiplier, head=cfg.method.train_head, replace_one=amplified
        )
        self.config = FlowerPrivacyConfig(
            target_delta=self.delta,
            population_size=self.population,
            neighboring_relation=NeighboringRelation.REPLACE_ONE if amplified else NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT if amplified else SamplingMethod.NO_AMPLIFICATION,
        )
        self.accountant = RdpAccountant(self.config)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> PrivacyLedger | None:
        """A ledger for DP runs, ``None`` when ``privacy.mode`` is off."""
        return None if cfg.privacy.mode == "off" else cls(cfg)

    def release(self, sample_size: int) -> None:
        """Compose one round's release (``sample_size`` clients sampled)."""
        size = min(max(int(sample_size), 1), self.population)
        self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, size, self.population))

    @property
    def releases(self) -> int:
        return int(self.accountant.num_releases)

    def epsilon(self) -> float:
        """Cumulative epsilon at ``privacy.delta`` (0 before the first release)."""
        return float(self.accountant.get_epsilon(self.delta)) if self.releases else 0.0

    def row(self) -> dict[str, Any]:
        """The metrics-row entries: ``privacy_epsilon``, ``privacy_delta``, ``privacy_releases``."""
        return {"privacy_epsilon": self.epsilon(), "privacy_delta": self.delta, "privacy_releases": self.releases}

    def state_dict(self) -> dict[str, object]:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.accountant.load_state_dict(state)
