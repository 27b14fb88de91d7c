"""Synthesis of mmE5-style training records with GPT-4o or any OpenAI-compatible server (`mme5-synth`)."""
