"""What needs both a language model and an SAE: the SAE spliced into the model (CE loss recovered,
KL), loading any saved SAE for inference, and the HTML report of its latents. Above both stages:
it imports `cache_writer` (models, tokenizers) and `trainer` (architectures, exports); neither
imports it."""
