"""Weight quantization: bit packing, the HQQ quantizer, and the quantized linear layer."""

from .hqq import (
    QuantizedMeta,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    dequantize_meta,
    meta_block,
    quantize,
    tensor_layout,
)
from .linear import QuantLinear, reference_matmul
from .pack import SUPPORTED_BITS, pack, packed_words, unpack

__all__ = [
    "SUPPORTED_BITS",
    "QuantLinear",
    "QuantSpec",
    "QuantizedMeta",
    "QuantizedTensor",
    "dequantize",
    "dequantize_meta",
    "meta_block",
    "pack",
    "packed_words",
    "quantize",
    "reference_matmul",
    "tensor_layout",
    "unpack",
]
