"""A pipeline stage of a :class:`BmojoForCausalLM` that keeps the model's parameter names.

Both engines run the model through :class:`CausalLMStage`: alone it is the whole model; under pipeline
parallelism each rank holds the stage of its pipeline units. The auxiliary innovation loss of ``B`` layers
travels with the hidden states from stage to stage, so the last stage adds it to the loss and its gradient
reaches every predictor through the pipeline's backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bmojo.model.modeling import BmojoForCausalLM
from bmojo.parallel.plan import ParallelPlan


def _place(root: nn.Module, fqn: str, module: nn.Module) -> None:
    """Register ``module`` under the dotted ``fqn`` inside ``root``, creating empty containers on the way."""
    *parents, leaf = fqn.split(".")
    owner = root
    for name in parents:
        if not hasattr(owner, name):
            owner.add_module(name, nn.ModuleDict() if name == parents[-1] and leaf.isdigit() else nn.Module())
        owner = getattr(owner, name)
    owner.add_module(leaf, module)


class CausalLMStage(nn.Module):
    """The units ``units`` of ``model`` (plus the embedding on the first stage, norm and head on the last).

    forward(first stage: input_ids [B, T]; later stages: hidden [B, T', D] and aux []) returns
    (hidden [B, T', D] or, on the last stage, logits [B, T', V'], aux []) where ``aux`` is the running sum of
    the unweighted auxiliary losses. ``T'`` and ``V'`` are per-rank sizes under sequence / tensor parallelism.
    """

    def __init__(self, model: BmojoForCausalLM, plan: ParallelPlan, units: range):
        super().__init__()
        self.config = model.config
        self.is_first = units.start == 0
        self.is_last = units.stop == plan.num_units
        self.activation_checkpointing = False
        for fqn in plan.before_units if self.is_first else ():
            _place(self, fqn, model.get_submodule(fqn))
        for index in units:
            _place(self, f"{plan.units}.{index}", model.get_submodule(f"{plan.units}.{index}"))
        for fqn in plan.after_units if self.is_last else ():
            _place(self, fqn, model.get_submodule(fqn))
        if self.is_first and self.is_last and model.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def units(self) -> list[nn.Module]:
        return list(self.model.layers.values())

    def forward(self, inputs: torch.Tensor, aux: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.model.embed_tokens(inputs) if self.is_first else inputs
        aux_total = x.new_zeros((), dtype=torch.float32) if aux is None else aux
        for block in self.units():
            if self.activation_checkpointing and torch.is_grad_enabled():
                out = checkpoint(block, x, use_reentrant=False)
            else:
                out = block(x)
            x = out[0]
            # Decided from the module, not the returned value, so symbolic tracing (NxD's pipeline) sees it too.
            if _has_aux_loss(block):
                aux_total = aux_total + out[1]
        if self.is_last:
            x = self.lm_head(self.model.norm(x))
        return x, aux_total


def _has_aux_loss(block: nn.Module) -> bool:
    return getattr(block.mixer, "predictor", None) is not None


class CausalLMWithLoss(CausalLMStage):
    """The whole model as one module whose forward returns the loss, for engines that drive the model through
    a ``forward(input_ids, labels) -> (loss, aux_loss)`` (NxD's pipeline traces exactly this).

    ``lm_loss(logits [B, T, V'], labels [B, T]) -> scalar`` computes the next-token loss of this rank's logits.
    """

    def __init__(self, model: BmojoForCausalLM, plan: ParallelPlan, lm_loss):
        super().__init__(model, plan, range(plan.num_units))
        self.lm_loss = lm_loss

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux = super().forward(input_ids)
        weighted_aux = aux * self.config.aux_loss_weight
        return self.lm_loss(logits, labels) + weighted_aux, weighted_aux
