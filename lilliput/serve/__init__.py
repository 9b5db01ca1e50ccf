"""The OpenAI-compatible server (`lilliput serve`): protocol shapes, the engine thread, metrics, the app."""
