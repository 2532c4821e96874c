"""What training and serving must agree on, each fact once: prompt templates, the adapter manifest, the
adapter's files and LoRA settings (lora), adapter names, the base model's identity and position limit, and
the backend choice (with the `import unsloth` that must precede transformers).

This is the only package that both `training` and `server` import. At import it needs nothing heavier
than the standard library and pydantic (torch and transformers only inside the functions that read a
model), so the server reads a manifest and an adapter config without loading trl or peft.
"""

__version__ = "0.1.0"  # the product's version, as both sides and the `loraserve` command report it
