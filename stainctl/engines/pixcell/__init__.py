"""The PixCell diffusion engine, the CK7 kidney study method: UNI2-h tokens -> flow MLP ->
PixCell transformer + LoRA -> SD3.5 VAE."""
