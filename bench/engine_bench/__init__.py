"""In-process engine benchmark: our engine against HF generate + PEFT, HF static cache, Unsloth and vLLM, one run.

Same workload for every method: a random-weight Llama, prompts of --input-len random token ids, exactly
--output-len new tokens (EOS never stops a row), and --adapters random rank-16 LoRA adapters on the seven
projections (B nonzero, so an adapter changes the output). Scenarios:

    bs1                      1 stream, 1 adapter
    streams8/32/64           that many concurrent streams, adapters round-robin (row i gets adapter i % N)
    streams8_base            8 streams, no adapter (the LoRA cost is streams8 against this)
    ttft512                  time to first token of one --ttft-len-token prompt with an adapter (median of 3)
    ttft512_base             the same on the base model

Each runs greedy and, as NAME_sampled, sampled (temperature 1, top_p 0.95, a seed per request where the
method takes one); --sampling restricts to one. Decode scenarios report the median of --waves waves.

Methods: hf_peft (generate with PEFT's mixed-batch `adapter_names`, one static batch: how HF serves),
hf_static (the same with cache_implementation="static": transformers compiles the decode step; CUDA only),
unsloth (its own process, since importing it patches transformers; one adapter for every row, as its fused
path ignores per-row adapter names; CUDA only), vllm (vLLM's offline API in its own process and Python
environment, --vllm-env; prompts and adapters travel as files), ours (server.engine.engine with all
streams submitted at once), ours_sdpa (the same with SDPA instead of the split-KV decode attention kernel),
ours_eager (the same without CUDA graphs).
Speeds are reported as ratios against the baselines of the same run and as % of the memory roofline at
a copy bandwidth measured in the same run (DESIGN.md, Performance method). Prints tables; --json writes all.

Where ours and hf_peft both ran, their greedy tokens are compared per row: at the first that differs,
hf_peft's own logits (its tokens teacher-forced) show whether the two were a near-tie, as rounding in bf16
makes (--dtype; fp32 on the CPU matches token for token), or far apart, as a bug makes.

    python -m bench.engine_bench --model tiny --quick                       # CPU: hf_peft and ours
    python -m bench.engine_bench --model llama3-8b-random --methods ours,vllm --json out.json   # GPU

Modules: workload (model, adapters, prompts, scenarios), measure (records shared by every method),
hf_peft, ours, unsloth_child, vllm_child (one per method), roofline, analysis (match and divergence),
report (tables, JSON). This file imports nothing: vllm_child runs in vLLM's environment, without our
dependencies, and imports the package on its way.
"""
