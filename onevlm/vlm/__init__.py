"""The VLM role: loading local image-text-to-text models, decoding engines, synthetic models."""
