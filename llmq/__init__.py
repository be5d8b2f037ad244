"""llmq: calibrated weight quantization for Hugging Face causal LMs.

Data flows  data -> pipeline (layer streaming) -> methods (rtn/gptq) -> QuantizedTensor
-> formats (packing) -> checkpoint -> eval.
"""

__version__ = "0.2.0"
