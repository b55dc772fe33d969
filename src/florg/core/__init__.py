"""florg.core: the FLoRG math in pure torch (no Flower, no PEFT)."""

from .aggregate import AggregationResult, aggregate, aggregate_gram, procrustes_align
from .bases import init_factor, layer_seed, make_bases
from .gram import DEFAULT_EIG_RTOL, GramAccumulator, GramFactor, gram_eigen
from .validation import check_factors, normalise_weights
from .whole_model import aggregate_model

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
