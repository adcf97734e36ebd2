"""splitserve's load generator: trace replay (BurstGPT, Azure LLM inference, Mooncake) and
synthetic workloads against any OpenAI-compatible or splitserve gRPC endpoint, with TTFT/TPOT
SLO attainment, goodput, tenant fairness, reports and plots. It talks to the system only
through its public HTTP/gRPC APIs (and reads a model's tokenizer to size prompts exactly)."""
