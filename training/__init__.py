"""Alpaca data → prompt template → LoRA fine-tune → adapter dir with a manifest."""
