"""florg.core: the FLoRG math in pure torch (no Flower, no PEFT)."""

from .aggregate import (
    DEFAULT_EIG_RTOL,
    AggregationResult,
    GramAccumulator,
    GramFactor,
    aggregate,
    aggregate_gram,
    aggregate_model,
    gram_eigen,
    procrustes_align,
)
from .bases import init_factor, layer_seed, make_bases
from .validation import check_factors, normalise_weights

__all__ = [
    "DEFAULT_EIG_RTOL",
    "AggregationResult",
    "GramAccumulator",
    "GramFactor",
    "aggregate",
    "aggregate_gram",
    "aggregate_model",
    "check_factors",
    "gram_eigen",
    "init_factor",
    "layer_seed",
    "make_bases",
    "normalise_weights",
    "procrustes_align",
]
