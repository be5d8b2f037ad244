"""Everything bitsandbytes in one package: its grids (NF4, FP4, LLM.int8) and its checkpoint layout."""
