"""Inference on trained models: export to the Hugging Face Llava format, chat and evaluation."""
