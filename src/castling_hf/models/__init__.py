"""The Castling model families, one folder each with its configuration and modeling files, as `transformers` lays out
its models; the attention math they share lives in `castling_hf.attention`."""
