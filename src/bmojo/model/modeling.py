"""`BmojoModel` and `BmojoForCausalLM`: the stack ``x += mixer(norm(x)); x += mlp(norm(x))`` (DESIGN §2)."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from bmojo.config import BmojoConfig
from bmojo.model.attention import AttentionMixer, AttentionState
from bmojo.model.layers import InitRole, RMSNorm, RotaryEmbedding, SwiGLU
from bmojo.model.mamba2 import Mamba2Mixer, SSMState
from bmojo.model.memory import InnovationPredictor
from bmojo.model.padded_generation import LengthGroupedCache, forward_by_prompt_length
from bmojo.model.row_cache import RowCache
from bmojo.remote import add_remote_code


class BmojoCache(RowCache):
    """Recurrent state of every layer (DESIGN §2.5); its size does not grow with the context for W, M, F, B.

    ``states[i]`` is an :class:`SSMState` (``M``) or an :class:`AttentionState` (other letters), filled by the
    first forward that receives this cache; every row of every layer's state follows its sequence.
    """

    def __init__(self, config: BmojoConfig):
        super().__init__()
        self.states: list[SSMState | AttentionState | None] = [None] * config.num_hidden_layers

    def __repr__(self) -> str:
        return f"BmojoCache(seen_tokens={self.seen_tokens}, layers={len(self.states)})"

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.states)

    def batch_size(self) -> int:
        for state in self.states:
            if state is not None:  # every field tensor of a state is batch-major
                fields = (getattr(state, field.name) for field in dataclasses.fields(state))
                return next(value for value in fields if isinstance(value, torch.Tensor)).shape[0]
        return 0

    def _continue_rows(self, sources: torch.Tensor) -> None:
        self._map_rows(lambda rows: rows.index_select(0, sources.to(rows.device)))

    def _map_rows(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for state in self.states:
            if state is not None:
                _map_batch_tensors(state, transform)


def _map_batch_tensors(state: object, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every tensor field of a layer state (and of the states nested in it) by ``transform`` of it.

    All of them are batch-major. The one field shared by the batch, an attention state's RoPE tables, is a
    tuple and stays; so do plain numbers (a memory's next reveal position: the smallest over the rows, which
    selecting or repeating rows can only raise, so the old one stays a safe point to look again).
    """
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if isinstance(value, torch.Tensor):
            setattr(state, field.name, transform(value))
        elif dataclasses.is_dataclass(value):
            _map_batch_tensors(value, transform)


class BmojoBlock(nn.Module):
    def __init__(self, config: BmojoConfig, letter: str):
        super().__init__()
        self.letter = letter
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = Mamba2Mixer(config) if letter == "M" else AttentionMixer(config, letter)
        # intermediate_size 0: a block of the mixer alone (the published Mamba-2 has no MLP).
        has_mlp = config.intermediate_size > 0
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if has_mlp else None
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size) if has_mlp else None

    def forward(
        self, x: torch.Tensor, cache: BmojoCache | None = None, layer_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Parallel form. x: [B, T, D] -> (x: [B, T, D], unweighted aux loss of a B mixer or None); with a
        ``cache``, stores the layer's state after the last token in it (a prefill)."""
        h = self.mixer_norm(x)
        aux = None
        if isinstance(self.mixer, Mamba2Mixer):
            mixed, state = self.mixer(h)
        else:
            mixed, aux, state = self.mixer(h, want_state=cache is not None)
        if cache is not None:
            cache.states[layer_idx] = state
        return self._add_mixed_and_mlp(x, mixed), aux

    def step(
        self, x: torch.Tensor, state: SSMState | AttentionState, position: int
    ) -> tuple[torch.Tensor, SSMState | AttentionState]:
        """Recurrent form of one token at ``position`` (an attention layer's ``before_token`` done, its
        ``after_token`` to follow). x: [B, 1, D] -> (x: [B, 1, D], the layer's next state)."""
        h = self.mixer_norm(x)
        if isinstance(self.mixer, Mamba2Mixer):
            mixed, state = self.mixer(h, state)
        else:
            mixed = self.mixer.step(h, position, state)
        return self._add_mixed_and_mlp(x, mixed), state

    def continue_chunk(
        self, x: torch.Tensor, state: SSMState | AttentionState, start: int
    ) -> tuple[torch.Tensor, SSMState | AttentionState]:
        """Recurrent form of T tokens at positions ``start`` ... ``start + T - 1``, eagerly: a Mamba-2 layer scans
        the chunk in parallel from its state, an attention layer steps token by token, the MLP runs on the whole
        chunk. x: [B, T, D] -> (x: [B, T, D], the layer's next state)."""
        h = self.mixer_norm(x)
        if isinstance(self.mixer, Mamba2Mixer):
            mixed, state = self.mixer(h, state)
        else:
            steps = []
            for i in range(x.shape[1]):
                self.mixer.before_token(start + i, state)
                steps.append(self.mixer.step(h[:, i : i + 1], start + i, state))
                self.mixer.after_token(start + i, state)
            mixed = torch.cat(steps, dim=1)
        return self._add_mixed_and_mlp(x, mixed), state

    def _add_mixed_and_mlp(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The block's residual additions: the mixer's output, then the MLP's (if any). x, mixed: [B, T, D]."""
        x = x + mixed
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))


@dataclass
class BmojoOutput(ModelOutput):
    """Backbone output. ``aux_loss``: weighted innovation-predictor loss summed over B layers (zero if none)."""

    last_hidden_state: torch.Tensor | None = None
    cache: BmojoCache | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BmojoCausalLMOutput(ModelOutput):
    """``loss`` = next-token cross-entropy + ``aux_loss`` (what to backpropagate); both reported."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: BmojoCache | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class BmojoPreTrainedModel(PreTrainedModel):
    config_class = BmojoConfig
    config: BmojoConfig
    base_model_prefix = "model"
    _no_split_modules = ["BmojoBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own BmojoCache; a DynamicCache cannot hold SSM states or the eidetic memory.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """One rule for the family, applied by transformers to each module once (children first).

        Linear weights are normal(0, ``initializer_range``), except those tagged by :func:`mark_init`: residual
        outputs (``o_proj``, ``down_proj``, an M layer's ``out_proj``) divided by the square root of the number
        of residual branches (GPT-2's rule with mamba_ssm's branch count; mamba_ssm itself scales a
        kaiming-uniform draw), so deep stacks start near the identity; and the inner SSM's ``out_proj`` in F/B
        layers at std ``1/sqrt(fan_in)``, so its output (after the gated RMSNorm, RMS 1) has RMS 1 like the
        layer input and fading keys/values start at the scale of the local ones.
        """
        if isinstance(module, nn.Linear):
            role = getattr(module, "init_role", InitRole.default)
            std = {
                InitRole.default: self.config.initializer_range,
                InitRole.residual_output: self.config.initializer_range / math.sqrt(self._residual_branches()),
                InitRole.fading_output: module.in_features**-0.5,
            }[role]
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, Mamba2Mixer):
            heads = module.num_heads
            init.copy_(module.A_log, torch.log(torch.linspace(1, 16, heads)))
            init.ones_(module.D)
            lo, hi = module.dt_range
            dt = torch.exp(torch.rand(heads) * (math.log(hi) - math.log(lo)) + math.log(lo))
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            init.zeros_(module.conv1d.bias)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.frequencies())

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained``, plus the small remote-code modules ``config.json``'s ``auto_map``
        names (:mod:`bmojo.remote`), so every saved folder loads with ``trust_remote_code=True`` where ``bmojo`` was
        never imported."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            add_remote_code(save_directory)

    def auxiliary_parameter_names(self) -> set[str]:
        """Names of the parameters only an auxiliary loss trains (the innovation predictors of B layers): the
        language-model loss never reaches them, so parameter budgets leave them out."""
        return {
            f"{prefix}.{name}" if prefix else name
            for prefix, module in self.named_modules()
            if isinstance(module, InnovationPredictor)
            for name, _ in module.named_parameters()
        }

    def parameter_counts(self) -> tuple[int, int]:
        """(language-model, auxiliary-only) parameter counts; tied weights counted once."""
        auxiliary = self.auxiliary_parameter_names()
        named = dict(self.named_parameters())
        aux_count = sum(p.numel() for name, p in named.items() if name in auxiliary)
        return sum(p.numel() for p in named.values()) - aux_count, aux_count

    def _residual_branches(self) -> int:
        """Additions into the residual stream: a mixer per layer, and an MLP per layer unless there is none."""
        return self.config.num_hidden_layers * (2 if self.config.intermediate_size else 1)


class BmojoModel(BmojoPreTrainedModel):
    def __init__(self, config: BmojoConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BmojoBlock(config, letter) for letter in config.layer_letters)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        # Layers whose decode state needs before_token / after_token around each step.
        self._attention_layers = [
            idx for idx, block in enumerate(self.layers) if isinstance(block.mixer, AttentionMixer)
        ]
        # Set by compile_decoding: a compiled copy of BmojoModel.token_step, called with the model as argument.
        self._compiled_token_step: Callable | None = None
        self.post_init()

    def compile_decoding(self, **compile_options) -> None:
        """Decode every token through one ``torch.compile``'d graph of all layers' recurrent steps.

        Decoding a token is bound by the number of small ops it launches (one sequence, CPU or GPU); compiling
        the whole step fuses them. What depends on the position rather than on the token (RoPE tables, which
        slots a query sees, memory pushes) runs eagerly around the graph, so the step has no branch on the
        position. It still compiles a few variants early on (the first position, then any position, and, for
        inductor, positions at slot 0 of the window and of the memory block: up to about five, the last within
        lcm(window, memory block) tokens) and then none; a new batch size compiles again. ``compile_options`` go
        to ``torch.compile`` (``fullgraph=True`` unless given). Outputs match eager decoding's to rounding.
        """
        if self.config.store_topk and "B" in self.config.layer_letters:
            raise ValueError(
                "compile_decoding does not support the in-storage memory (store_topk > 0): the store grows every "
                "memory block, and a compiled step needs fixed shapes; decode eagerly"
            )
        # Compiled code is cached per code object, and the number of variants kept per code object is capped
        # (torch._dynamo.config.recompile_limit): a copy of token_step's code gives this model its own cache,
        # so models of other sizes in the same process do not crowd it out.
        code = BmojoModel.token_step.__code__.replace()
        step = types.FunctionType(code, BmojoModel.token_step.__globals__, "token_step")
        self._compiled_token_step = torch.compile(step, **{"fullgraph": True, **compile_options})

    def __getstate__(self) -> dict:
        # The compiled step cannot be pickled (its code is a copy): a pickled or deep-copied model decodes
        # eagerly until compile_decoding is called on it.
        return {**super().__getstate__(), "_compiled_token_step": None}

    def token_step(self, x: torch.Tensor, states: list[SSMState | AttentionState], position: int) -> torch.Tensor:
        """One token at ``position`` through every layer's recurrent step and the final norm (between each
        attention layer's ``before_token`` and ``after_token``). x: [B, 1, D] -> [B, 1, D]; updates ``states``."""
        for idx, block in enumerate(self.layers):
            x, states[idx] = block.step(x, states[idx], position)
        return self.norm(x)

    def _decode(self, x: torch.Tensor, cache: BmojoCache) -> torch.Tensor:
        """Recurrent form continuing ``cache``: x: [B, T, D] embedded tokens -> normed hidden states [B, T, D].

        Eagerly a chunk of several tokens goes layer by layer (Mamba-2 layers scan it in parallel); the compiled
        step, and a single token, go token by token through all layers.
        """
        if self._compiled_token_step is None and x.shape[1] > 1:
            for idx, block in enumerate(self.layers):
                x, cache.states[idx] = block.continue_chunk(x, cache.states[idx], cache.seen_tokens)
            return self.norm(x)
        step = self._compiled_token_step or BmojoModel.token_step
        outputs = []
        for i in range(x.shape[1]):
            position = cache.seen_tokens + i
            for idx in self._attention_layers:
                self.layers[idx].mixer.before_token(position, cache.states[idx])
            outputs.append(step(self, x[:, i : i + 1], cache.states, position))
            for idx in self._attention_layers:
                self.layers[idx].mixer.after_token(position, cache.states[idx])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: BmojoCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache_position: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BmojoOutput:
        """input_ids: [B, T] -> last_hidden_state [B, T, D]; with ``use_cache`` continues/returns ``cache``.

        ``position_ids`` / ``cache_position`` are accepted only as the running positions the model uses anyway;
        ``output_hidden_states`` gives the embeddings and every layer's output (the last one normed), as
        transformers models do, in the parallel form.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_attentions:
            raise ValueError(
                "output_attentions is not supported: the attention runs fused over local, fading and memory keys "
                "and keeps no attention weights"
            )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if cache is not None and not isinstance(cache, BmojoCache | LengthGroupedCache):
            raise TypeError(f"cache must be a BmojoCache (from a previous output), got {type(cache).__name__}")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        start = cache.seen_tokens if cache is not None else 0
        for name, positions in (("position_ids", position_ids), ("cache_position", cache_position)):
            _check_running_positions(name, positions, start, x.shape[1])
        if isinstance(cache, LengthGroupedCache) or (attention_mask is not None and not bool(attention_mask.all())):
            if isinstance(cache, BmojoCache):
                if cache.seen_tokens:
                    raise ValueError("a cache of unpadded rows cannot continue with padding (attention_mask zeros)")
                cache = None  # an empty one: the padded prefill returns its own
            return self._forward_left_padded(x, attention_mask, cache, use_cache, output_hidden_states)
        if use_cache and cache is None:
            cache = BmojoCache(self.config)
        aux_total = x.new_zeros((), dtype=torch.float32)
        all_hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        if cache is not None and cache.seen_tokens:  # continuing: the recurrent form
            if all_hidden is not None:
                raise ValueError("output_hidden_states works in the parallel forward, not when continuing a cache")
            hidden = self._decode(x, cache)
        else:  # the parallel form, filling a cache if one is given (a prefill)
            for idx, block in enumerate(self.layers):
                if all_hidden is not None:
                    all_hidden.append(x)
                if self.gradient_checkpointing and self.training and cache is None:
                    x, aux = self._gradient_checkpointing_func(block.__call__, x, None, idx)
                else:
                    x, aux = block(x, cache, idx)
                if aux is not None:
                    aux_total = aux_total + aux
            hidden = self.norm(x)
        if cache is not None:
            cache.seen_tokens += x.shape[1]
        return BmojoOutput(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            aux_loss=aux_total * self.config.aux_loss_weight,
            hidden_states=None if all_hidden is None else (*all_hidden, hidden),
        )

    def _forward_left_padded(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: LengthGroupedCache | None,
        use_cache: bool,
        output_hidden_states: bool | None,
    ) -> BmojoOutput:
        """A left-padded batch x: [B, T, D] (or the continuation of one), each prompt length on its own
        (:mod:`bmojo.model.padded_generation`); the hidden states at the padding are zero."""
        if output_hidden_states:
            raise ValueError("output_hidden_states is not supported for a padded batch; pass the rows unpadded")

        def run(embeds: torch.Tensor, group_cache: BmojoCache | None, group_use_cache: bool):
            out = self(inputs_embeds=embeds, cache=group_cache, use_cache=group_use_cache)
            return out.last_hidden_state, out.aux_loss, out.cache

        hidden, aux_loss, cache = forward_by_prompt_length(run, x, attention_mask, cache, use_cache)
        return BmojoOutput(last_hidden_state=hidden, cache=cache if use_cache else None, aux_loss=aux_loss)


def _check_running_positions(name: str, positions: torch.Tensor | None, start: int, length: int) -> None:
    """Refuse positions other than ``start ... start + length - 1`` in every row: the model places tokens at
    those absolute positions itself (RoPE, windows and memory blocks all follow from them)."""
    if positions is None:
        return
    expected = torch.arange(start, start + length, device=positions.device)
    if positions.shape[-1] != length or not bool((positions == expected).all()):
        raise ValueError(
            f"{name} must be the running positions {start}..{start + length - 1} (the model places tokens at their "
            "absolute positions itself); other positions (packed documents, padding offsets) are not supported"
        )


class BmojoForCausalLM(BmojoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BmojoConfig):
        super().__init__(config)
        self.model = BmojoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def compile_decoding(self, **compile_options) -> None:
        """Decode through a compiled step of all layers (:meth:`BmojoModel.compile_decoding`); ``generate`` and
        every call that continues a cache use it."""
        self.model.compile_decoding(**compile_options)

    def prepare_inputs_for_generation(self, input_ids, cache=None, use_cache=None, attention_mask=None, **kwargs):
        # The cache holds everything already seen, so only the unseen tail of input_ids is fed. The mask goes on:
        # a left-padded batch runs each prompt length on its own, so the padding never enters a state.
        if cache is not None and cache.seen_tokens:
            input_ids = input_ids[:, cache.seen_tokens :]
        inputs = {"input_ids": input_ids, "cache": cache, "use_cache": use_cache, "attention_mask": attention_mask}
        # generate asks for the last position's logits only (logits_to_keep), so a long prompt's prefill does not
        # build [B, T, V]; output requests go on to forward, which says what it cannot give.
        passed_on = ("logits_to_keep", "output_hidden_states", "output_attentions")
        return inputs | {name: kwargs[name] for name in passed_on if kwargs.get(name) is not None}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: BmojoCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        position_ids: torch.LongTensor | None = None,
        cache_position: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BmojoCausalLMOutput | tuple:
        """input_ids, labels: [B, T] (labels unshifted; -100 ignored) -> logits [B, T, V] and losses.

        Arguments the model cannot honour raise (see :meth:`BmojoModel.forward`); ``return_dict=False`` gives the
        output's fields as a tuple, as transformers models do.
        """
        if labels is not None and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "labels with a padded batch are not supported: padding is for inference (generate, scoring); "
                "train on packed sequences of equal length"
            )
        out = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache_position=cache_position,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"labels shape {tuple(labels.shape)} must equal input shape {tuple(hidden.shape[:2])}")
            # Shifting the labels (the last position gets none) rather than the logits spares a copy of the
            # logits and its zero-filled gradient: the loss is the same mean over the same tokens.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            loss = lm_loss + out.aux_loss
        output = BmojoCausalLMOutput(
            loss=loss, logits=logits, cache=out.cache, aux_loss=out.aux_loss, hidden_states=out.hidden_states
        )
        return output if return_dict is None or return_dict else output.to_tuple()
