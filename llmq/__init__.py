"""llmq: calibrated weight quantization for Hugging Face causal LMs.

Data flows  data -> pipeline (layer streaming) -> methods (rtn/gptq) -> QuantizedTensor
-> formats (packing) -> checkpoint -> eval.
"""

import os

__version__ = "0.2.0"

# The same command gives the same bytes.  MKL picks its matrix-product kernels from run to run (by the
# buffers' alignment and the threads it gets), and their sums differ in the last bits; at 2-3 bits such
# differences flip codes (stories260K W3 g32 fast: mean KL 0.334 or 0.357 from one command).  Conditional
# Numerical Reproducibility pins them, at no time measured (README, reproducibility).  MKL reads this at its
# first product, so it holds unless the process ran one before importing llmq; a value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
