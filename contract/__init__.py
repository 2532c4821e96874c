"""What training and serving must agree on: prompt templates and the adapter manifest.

This is the only package that both `training` and `server` import. It depends on nothing heavier
than the standard library and pydantic, so the server can read a manifest without loading trl.
"""
