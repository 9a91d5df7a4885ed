"""Data: ``--data`` blends of Megatron indexed data sets and text, streamed through megatron-core."""
