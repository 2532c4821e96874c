"""What a LoRA adapter directory holds, as both sides read and write it."""

from __future__ import annotations

# The seven Llama projections LoRA targets (Unsloth's notebook default, and what the server applies).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
