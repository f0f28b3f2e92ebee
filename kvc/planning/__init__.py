"""``kvc plan``: per (layer, K or V, KV head) method and bit width under a memory budget (docs/plan.md)."""
