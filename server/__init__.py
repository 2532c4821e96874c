"""Serve many LoRA adapters on one base model over HTTP.

Layers, outside in: `api` (FastAPI routers, wire formats) → `service` (request → engine params,
templates, stop strings) → `engine` (one worker thread owns the model: queue, batches, tokens) and
`adapters` (registry: validate, load, version, swap). Only `api` imports FastAPI; nothing here
imports `training`.
"""
