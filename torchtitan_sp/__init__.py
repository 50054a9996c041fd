"""torchtitan_sp: Llama 3 training recipes for very long sequences with context parallelism."""
