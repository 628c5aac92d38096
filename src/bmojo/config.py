"""`BmojoConfig`: one configuration for every member of the family (DESIGN §2)."""

from __future__ import annotations

from transformers import PretrainedConfig

LAYER_LETTERS = {
    "A": "causal full attention",
    "W": "sliding-window attention",
    "M": "Mamba-2 selective SSM",
    "F": "B'MOJO-F (window + fading tokens)",
    "B": "B'MOJO (window + fading tokens + eidetic memory)",
}
# Which past tokens the in-storage memory of a B layer keeps: every one, or those whose innovation ratio passes
# memory_threshold (the in-context memory's test without its per-block top-k and its size bound).
STORE_RULES = ("all", "innovative")
# How a decoding store finds its candidates once it holds store_index_from entries: a dense score over all of
# them, or a faiss index (flat: exact; hnsw: approximate, sublinear).
STORE_INDEXES = ("dense", "flat", "hnsw")


class BmojoConfig(PretrainedConfig):
    """Configuration of a B'MOJO-family causal language model.

    ``layer_pattern`` names the mixer of each layer, one letter a layer (``A W M F B``), repeated cyclically to
    ``num_hidden_layers``: ``"A"`` is a Transformer, ``"M"`` Mamba-2, ``"MW"`` a Samba-like stack, ``"F"``
    B'MOJO-F and ``"B"`` B'MOJO. Every field has a default, so ``BmojoConfig(layer_pattern="B")`` is a small
    valid model. Invalid combinations raise ``ValueError`` naming the field.
    """

    model_type = "bmojo"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 128,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 2,
        layer_pattern: str = "B",
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        qk_norm: bool = False,
        window_size: int = 32,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        ssm_state_size: int = 16,
        ssm_head_dim: int = 32,
        ssm_num_groups: int = 1,
        ssm_expand: int = 2,
        ssm_conv_kernel: int = 4,
        ssm_chunk_size: int = 64,
        ssm_dt_min: float = 1e-3,
        ssm_dt_max: float = 1e-1,
        memory_size: int = 32,
        memory_topk: int = 4,
        memory_block: int | None = None,
        memory_threshold: float = 0.5,
        innovation_rank: int | None = None,
        innovation_eps: float = 1e-6,
        aux_loss_weight: float = 0.1,
        tie_fading_proj: bool = True,
        memory_rope: bool = True,
        store_topk: int = 0,
        store_rule: str = "all",
        store_index: str = "dense",
        store_index_from: int = 65536,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        # SwiGLU at 8/3 the width keeps the MLP's parameter count equal to a 4x GELU MLP; round for kernels.
        # 0 builds blocks without an MLP (mamba_ssm's ``d_intermediate=0``, as the published Mamba-2).
        if intermediate_size is None:
            intermediate_size = 64 * ((8 * hidden_size // 3 + 63) // 64)
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_pattern = layer_pattern
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or (hidden_size // num_attention_heads if num_attention_heads else 0)
        self.qk_norm = qk_norm
        self.window_size = window_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.ssm_state_size = ssm_state_size
        self.ssm_head_dim = ssm_head_dim
        self.ssm_num_groups = ssm_num_groups
        self.ssm_expand = ssm_expand
        self.ssm_conv_kernel = ssm_conv_kernel
        self.ssm_chunk_size = ssm_chunk_size
        self.ssm_dt_min = ssm_dt_min
        self.ssm_dt_max = ssm_dt_max
        self.memory_size = memory_size
        self.memory_topk = memory_topk
        self.memory_block = memory_block or window_size
        self.memory_threshold = memory_threshold
        self.innovation_rank = innovation_rank
        self.innovation_eps = innovation_eps
        self.aux_loss_weight = aux_loss_weight
        self.tie_fading_proj = tie_fading_proj
        self.memory_rope = memory_rope
        # The in-storage eidetic memory (model/store.py): each query also reads the store_topk past tokens of
        # finished blocks it scores highest; 0 = no store. store_rule: which tokens the store keeps.
        self.store_topk = store_topk
        self.store_rule = store_rule
        self.store_index = store_index
        self.store_index_from = store_index_from
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate()

    @property
    def layer_letters(self) -> list[str]:
        """The mixer letter of every layer: ``layer_pattern`` repeated to ``num_hidden_layers``."""
        pattern = self.layer_pattern
        return [pattern[i % len(pattern)] for i in range(self.num_hidden_layers)]

    @property
    def ssm_inner_size(self) -> int:
        return self.ssm_expand * self.hidden_size

    @property
    def ssm_num_heads(self) -> int:
        return self.ssm_inner_size // self.ssm_head_dim

    def _validate(self) -> None:
        def fail(field: str, problem: str) -> None:
            raise ValueError(f"BmojoConfig.{field}: {problem}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "window_size"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                fail(field, f"must be a positive integer, got {getattr(self, field)!r}")
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 0:
            fail("intermediate_size", f"must be an integer >= 0 (0: no MLP), got {self.intermediate_size!r}")
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
            fail("layer_pattern", f"must be a non-empty string of the letters {''.join(LAYER_LETTERS)}")
        unknown = sorted(set(self.layer_pattern) - set(LAYER_LETTERS))
        if unknown:
            known = ", ".join(f"{k} = {v}" for k, v in LAYER_LETTERS.items())
            fail("layer_pattern", f"unknown letter(s) {unknown} in {self.layer_pattern!r}; use {known}")
        types = set(self.layer_letters)
        if types & set("AWFB"):
            if self.num_attention_heads < 1 or self.num_key_value_heads < 1:
                fail("num_attention_heads", "attention layers need at least one query and one key/value head")
            if self.num_attention_heads % self.num_key_value_heads:
                fail(
                    "num_key_value_heads",
                    f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}",
                )
            if self.head_dim % 2:
                fail("head_dim", f"RoPE needs an even head dimension, got {self.head_dim}")
        if types & set("MFB"):
            if self.ssm_inner_size % self.ssm_head_dim:
                fail(
                    "ssm_head_dim",
                    f"{self.ssm_head_dim} must divide ssm_expand * hidden_size = {self.ssm_inner_size}",
                )
            if self.ssm_num_heads % self.ssm_num_groups:
                fail(
                    "ssm_num_groups",
                    f"{self.ssm_num_groups} must divide the number of SSM heads {self.ssm_num_heads}",
                )
            for field in ("ssm_state_size", "ssm_conv_kernel", "ssm_chunk_size"):
                if getattr(self, field) < 1:
                    fail(field, f"must be >= 1, got {getattr(self, field)}")
            if not 0 < self.ssm_dt_min <= self.ssm_dt_max:
                fail("ssm_dt_min", "need 0 < ssm_dt_min <= ssm_dt_max")
        if "B" in types:
            if self.memory_size < 1:
                fail("memory_size", f"B layers need memory_size >= 1, got {self.memory_size}")
            if self.memory_block < 1:
                fail("memory_block", f"must be >= 1, got {self.memory_block}")
            if not 1 <= self.memory_topk <= self.memory_block:
                fail("memory_topk", f"must be in [1, memory_block={self.memory_block}], got {self.memory_topk}")
            if self.memory_threshold < 0:
                fail(
                    "memory_threshold",
                    f"must be >= 0 (0 = plain per-block top-k), got {self.memory_threshold}",
                )
            if self.innovation_rank is not None and not 1 <= self.innovation_rank <= self.hidden_size:
                fail(
                    "innovation_rank",
                    f"must be None (full) or in [1, hidden_size], got {self.innovation_rank}",
                )
            if self.store_topk < 0:
                fail("store_topk", f"must be >= 0 (0 = no in-storage memory), got {self.store_topk}")
            if self.store_rule not in STORE_RULES:
                fail("store_rule", f"must be one of {', '.join(STORE_RULES)}, got {self.store_rule!r}")
            if self.store_index not in STORE_INDEXES:
                fail("store_index", f"must be one of {', '.join(STORE_INDEXES)}, got {self.store_index!r}")
            if self.aux_loss_weight < 0:
                fail("aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")
