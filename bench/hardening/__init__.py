"""Hardening runs against a live server on the tiny model: each scenario drives real HTTP clients,
checks what must hold (counts and states) and prints its figures.

    python -m bench.hardening                      # every scenario, short (what CI runs, in tests/)
    python -m bench.hardening churn drain --full   # the full sizes of issue 13

Scenarios, one module each: churn (adapter load / reload / unload cycles under requests), storm
(streaming clients killed at random points), overload (2x capacity), hot_swap (a reload every second
under closed-loop load), faults (injected out-of-memory in a decode step and in an adapter load), drain
(SIGTERM with 32 open streams). Each returns a Report: figures to print and the failures it saw.
"""
