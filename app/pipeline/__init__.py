"""Stages that need neither torch nor the web: image decoding, table parsing, repetition guard, streamed text."""
