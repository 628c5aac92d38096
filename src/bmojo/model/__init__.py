"""The B'MOJO model family: architecture only (parallelism, kernels and training are applied from outside)."""

from bmojo.model.modeling import BmojoCache, BmojoForCausalLM, BmojoModel, BmojoPreTrainedModel

__all__ = ["BmojoCache", "BmojoForCausalLM", "BmojoModel", "BmojoPreTrainedModel"]
