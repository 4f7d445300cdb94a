"""A base model's linear layers kept in GGUF's quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the
k-quants Q2_K-Q6_K), computed by the compiled CPU kernels in `server/native/quant_kernels.cpp`: from a
twelfth (Q2_K) to about a quarter (Q8_0) of float32's bytes per step; exact mode gives the outputs of the
float32 model of the dequantized weights up to summation order, int8 mode a bounded deviation for faster
decode rows."""
