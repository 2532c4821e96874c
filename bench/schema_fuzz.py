"""Schema fuzzing: schemathesis against the checked-in spec and a live server, then every recorded
response judged again by bench/spec_check.py.

Schemathesis generates the cases (coverage phase: each boundary and wrong type of every field; fuzzing
phase: --max-examples random cases per operation) and runs its own checks: no 5xx, status codes, content
types and bodies as declared. Its HAR report holds every request it sent; this script counts those by
operation and status and checks each against the spec itself, so the figures do not rest on the
fuzzer's summary alone. Prints the figures; exits 1 on any 5xx, undeclared answer or schemathesis failure.

    python bench/schema_fuzz.py --url http://127.0.0.1:8000 --token "$LORASERVE_ADMIN_TOKEN" --max-examples 60
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.spec_check import SPEC_PATH, Spec  # noqa: E402

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@dataclass
class Figures:
    generated: int = 0  # test cases schemathesis generated (its summary)
    exit_code: int = 0
    failures: list[str] = field(default_factory=list)  # schemathesis's failure summary lines
    requests: int = 0  # requests recorded in the HAR
    by_operation: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    probes: Counter = field(default_factory=Counter)  # methods the spec does not declare: status → count
    violations: list[str] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in (self.by_status + self.probes).items() if status >= 500)

    @property
    def clean(self) -> bool:
        return self.exit_code == 0 and not self.failures and not self.violations and self.server_errors == 0


def fuzz(
    url: str,
    *,
    token: str | None,
    max_examples: int,
    seed: int | None = None,
    spec: Path = SPEC_PATH,
    keep: Path | None = None,
) -> Figures:
    """`keep`: a directory to write schemathesis's reports into (else a temporary one)."""
    with tempfile.TemporaryDirectory(prefix="schema-fuzz-") as scratch:
        reports = str(Path(keep or scratch).resolve())
        # In the scratch dir: schemathesis keeps a cache of crashes (.schemathesis/) where it runs.
        command = _command(url, token, max_examples, seed, spec.resolve(), reports)
        proc = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
        figures = _summary(proc.stdout, proc.returncode)
        har = next(Path(reports).glob("*.json"), None)
        if har is None:
            figures.failures.append(f"no HAR report; schemathesis said:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
            return figures
        _judge(json.loads(har.read_text())["log"]["entries"], Spec.load(spec), figures)
    return figures


def _command(url, token, max_examples, seed, spec, reports) -> list[str]:
    cli = Path(sys.executable).with_name("schemathesis")
    command = [str(cli), "run", str(spec), "--url", url, "--checks", CHECKS, "--max-examples", str(max_examples)]
    command += ["--phases", "examples,coverage,fuzzing", "--continue-on-failure", "--workers", "1"]
    command += ["--request-timeout", "60", "--report", "har", "--report-dir", reports, "--no-color"]
    if token:
        command += ["--header", f"Authorization: Bearer {token}"]
    if seed is not None:
        command += ["--seed", str(seed)]
    return command


def _summary(output: str, exit_code: int) -> Figures:
    generated = re.search(r"(\d+) generated", output)
    failures = re.findall(r"^\s*❌\s+(ST\d+ .+)$", output, flags=re.MULTILINE)
    return Figures(generated=int(generated.group(1)) if generated else 0, exit_code=exit_code, failures=failures)


def _judge(entries: list[dict], spec: Spec, figures: Figures) -> None:
    for entry in entries:
        request, response = entry["request"], entry["response"]
        status = response["status"]
        figures.requests += 1
        op = spec.operation(request["method"], urlsplit(request["url"]).path)
        if op is None:  # schemathesis probes undeclared methods; the answer must be a 405
            figures.probes[status] += 1
            if status != 405:
                figures.violations.append(f"{request['method']} {request['url']}: {status} for a method not served")
            continue
        label = f"{op.method.upper()} {op.template}"
        figures.by_operation[label] += 1
        figures.by_status[status] += 1
        content = response.get("content", {})
        for problem in spec.problems(op, status, content.get("mimeType", ""), content.get("text", "")):
            figures.violations.append(f"{label}: {problem}")


def report(figures: Figures) -> str:
    lines = [
        f"cases generated (schemathesis): {figures.generated}",
        f"requests recorded: {figures.requests} ({sum(figures.probes.values())} of them undeclared-method probes)",
        f"5xx responses: {figures.server_errors}",
        f"responses not fitting the spec: {len(figures.violations)}",
        f"schemathesis failures: {len(figures.failures)} (exit {figures.exit_code})",
        "status codes: " + ", ".join(f"{s}: {n}" for s, n in sorted(figures.by_status.items())),
        "probes: " + ", ".join(f"{s}: {n}" for s, n in sorted(figures.probes.items())),
        "requests per operation:",
        *(f"  {label:34} {n}" for label, n in sorted(figures.by_operation.items())),
    ]
    lines += [f"  FAILURE {line}" for line in figures.failures]
    lines += [f"  VIOLATION {line}" for line in figures.violations[:50]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the live server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", help="sent as 'Authorization: Bearer ...': the admin token (and API key, if any)")
    parser.add_argument("--max-examples", type=int, default=60, help="fuzzing-phase cases per operation")
    parser.add_argument("--seed", type=int, help="schemathesis's seed, to repeat a run")
    parser.add_argument("--spec", type=Path, default=SPEC_PATH)
    parser.add_argument("--keep-reports", type=Path, help="keep schemathesis's HAR report (every request) here")
    args = parser.parse_args()
    figures = fuzz(
        args.url,
        token=args.token,
        max_examples=args.max_examples,
        seed=args.seed,
        spec=args.spec,
        keep=args.keep_reports,
    )
    print(report(figures))
    return 0 if figures.clean else 1


if __name__ == "__main__":
    sys.exit(main())
