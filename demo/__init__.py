"""Stand-ins for a run without competition data or model weights: synthetic rows and a tiny Qwen3."""
