"""A base model's linear layers kept in GGUF's quantized blocks (Q4_0, Q4_1, Q8_0), computed by the
compiled CPU kernels in `server/native/quant_kernels.cpp`: a quarter to a half of float32's bytes per
step, the same outputs as the float32 model of the dequantized weights up to summation order."""
