"""The specialty role: one VLM fine-tuned per specialty (QLoRA), serving several tasks chosen by the prompt."""
