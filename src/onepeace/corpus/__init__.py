"""The demo corpus: real image-text and audio-text pairs from offline-installable sources (docs/demo_corpus.md)."""
