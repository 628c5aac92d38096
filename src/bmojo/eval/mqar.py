"""MQAR recall accuracy, and what the eidetic memory of each ``B`` layer held when the keys were queried."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bmojo.data.mqar import IGNORE_INDEX, MqarConfig, MqarLayout, answer_labels, generate
from bmojo.model.attention import AttentionMixer
from bmojo.model.memory import innovation_scores, select_memory

TEST_SEED_OFFSET = 2_000_003  # test examples come from a stream that neither training nor validation uses


@dataclass
class MqarResult:
    """Accuracy of the value predicted at each query key (argmax over the whole vocabulary).

    ``value_in_memory[i]``: for the ``i``-th ``B`` layer, the share of queries whose pair value was in the
    memory that the query could read (valid and behind its window); empty for models without ``B`` layers.
    """

    accuracy: float
    queries: int
    value_in_memory: list[float] = field(default_factory=list)


class _MemoryProbe:
    """Records each ``B`` layer's input and SSM output in a forward pass, to replay its memory selection."""

    def __init__(self, model: torch.nn.Module):
        self.mixers = [m for m in model.modules() if isinstance(m, AttentionMixer) and m.predictor is not None]
        self.inputs: dict[int, torch.Tensor] = {}
        self.ssm_prev: dict[int, torch.Tensor] = {}
        self.handles = []
        for index, mixer in enumerate(self.mixers):
            self.handles.append(mixer.register_forward_pre_hook(self._keep(self.inputs, index)))
            self.handles.append(mixer.predictor.register_forward_pre_hook(self._keep(self.ssm_prev, index)))

    @staticmethod
    def _keep(store: dict[int, torch.Tensor], index: int):
        def hook(module, args):
            store[index] = args[0].detach()

        return hook

    def memory(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [B, NB, M], valid [B, NB, M]) the queries of each memory block of layer ``index`` read."""
        mixer = self.mixers[index]
        iota, _ = innovation_scores(mixer.predictor, self.inputs[index], self.ssm_prev[index], mixer.innovation_eps)
        length = iota.shape[1]
        return select_memory(
            iota,
            block=mixer.memory_block,
            topk=mixer.memory_topk,
            threshold=mixer.memory_threshold,
            memory_size=mixer.memory_size,
            num_query_blocks=-(-length // mixer.memory_block),
        )

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _values_in_memory(
    positions: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor, input_ids: torch.Tensor, mixer, num_pairs
) -> torch.Tensor:
    """[Q] bool: whether the pair value of each query ``(batch, position)`` was readable from memory."""
    batch_index, query_pos = queries.unbind(-1)
    pair_keys = input_ids[batch_index, : 2 * num_pairs : 2]  # [Q, K]
    value_pos = 2 * (pair_keys == input_ids[batch_index, query_pos, None]).long().argmax(-1) + 1
    block = query_pos // mixer.memory_block
    held = positions[batch_index, block]  # [Q, M]
    readable = valid[batch_index, block] & (held < (query_pos - mixer.window + 1)[:, None])
    return (readable & (held == value_pos[:, None])).any(-1)


@torch.no_grad()
def evaluate_mqar(
    model: torch.nn.Module, config: MqarConfig, seq_len: int, examples: int = 256, batch_size: int = 32, seed: int = 0
) -> MqarResult:
    """Recall accuracy on ``examples`` fresh MQAR examples (a seed stream training never saw)."""
    layout = MqarLayout(config, seq_len)
    generated = generate(layout, examples, seed + TEST_SEED_OFFSET)
    ids, answers = torch.as_tensor(generated.ids), answer_labels(layout, generated)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probe = _MemoryProbe(model)
    correct, total = 0, 0
    in_memory = [0] * len(probe.mixers)
    try:
        for batch in ids.to(device).split(batch_size):
            labels = answers(batch)
            logits = model(batch).logits
            answered = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: logits at t predict labels at t+1
            correct += int((logits[:, :-1].argmax(-1) == labels[:, 1:])[answered].sum())
            total += int(answered.sum())
            queries = answered.nonzero()  # (batch, query position)
            for index, mixer in enumerate(probe.mixers):
                positions, valid = probe.memory(index)
                found = _values_in_memory(positions, valid, queries, batch, mixer, config.num_pairs)
                in_memory[index] += int(found.sum())
    finally:
        probe.close()
        model.train(was_training)
    return MqarResult(accuracy=correct / total, queries=total, value_in_memory=[n / total for n in in_memory])
