"""What training and serving read from a base model's config before loading it."""

from __future__ import annotations


def position_limit(base_model: str) -> int | None:
    """The positions the model was made for (None if its config does not say). Both sides cap their
    sequence length here before loading: asked for more, Unsloth silently rescales RoPE, and the model
    then differs from the one the adapter's fingerprint names."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(base_model), "max_position_embeddings", None)
    return int(limit) if limit else None
