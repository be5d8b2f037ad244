"""Everything GGUF (llama.cpp's file format) in one package.

  types.py   one record per tensor type: what a block stores, how it packs and unpacks
  fit.py     how the block grids are fitted (llama.cpp's scale searches and rounding rule)
  plan.py    which type each tensor of a model gets, and its name in the file
  model.py   what llama.cpp's graph of each family expects: configs, metadata, stored layouts
  vocab.py   the tokenizer tables
  writer.py  the file as an output sink of a quantization run
  reader.py  files read back as torch models (llmq eval)
"""
