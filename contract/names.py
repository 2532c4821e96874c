"""The one rule for adapter names, shared by training (--name) and the server (admin loads), so that
a name training accepts is one the server can load: letters and digits, then also . _ - (64 at most).
Anchored with \\Z: `$` would also accept a trailing newline."""

from __future__ import annotations

import re

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ADAPTER_NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
